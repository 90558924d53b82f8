#!/bin/sh
# Stops on SIGUSR1 only: writes "stopped" to $PROG_OUT/<message id> and exits 75. Otherwise works for a minute.
trap 'echo stopped > "$PROG_OUT/$SPOT_MESSAGE_ID"; exit 75' USR1
touch "$PROG_OUT/$SPOT_MESSAGE_ID.started"
i=0
while [ "$i" -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
