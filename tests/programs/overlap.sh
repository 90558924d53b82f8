#!/bin/sh
# Appends "<start> <end> <parent pid> <id>" to $PROG_EVENTS after sleeping 1.5 s.
start=$(date +%s.%N)
sleep 1.5
echo "$start $(date +%s.%N) $PPID $SPOT_MESSAGE_ID" >> "$PROG_EVENTS"
