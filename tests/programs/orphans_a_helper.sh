#!/bin/sh
# Backgrounds a helper from a subshell (the helper is orphaned at once, while this program runs on),
# writes the helper's pid to $PROG_PIDS, then finishes successfully a few seconds later.
( sleep 30 & echo $! > "$PROG_PIDS.tmp" && mv "$PROG_PIDS.tmp" "$PROG_PIDS" )
sleep "${PROG_RUN_S:-3}"
exit 0
