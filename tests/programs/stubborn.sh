#!/bin/sh
# Ignores SIGTERM, starts a background child (in its group) and an escaped one (its own session),
# checkpoints {"step": 1}, then never ends. Writes "<own pid> <child> <escaped>" to $PROG_PIDS.
trap '' TERM
sleep 1000 &
child=$!
# shellcheck disable=SC2016  # $$ is the escaped shell's own pid, expanded there
setsid sh -c 'echo $$ > "$PROG_PIDS.escaped"; exec sleep 1001' &
while [ ! -s "$PROG_PIDS.escaped" ]; do sleep 0.05; done
printf '{"step": 1}' > "$SPOT_CHECKPOINT_FILE.tmp" && mv "$SPOT_CHECKPOINT_FILE.tmp" "$SPOT_CHECKPOINT_FILE"
echo "$$ $child $(cat "$PROG_PIDS.escaped")" > "$PROG_PIDS.tmp" && mv "$PROG_PIDS.tmp" "$PROG_PIDS"
while :; do sleep 0.1; done
