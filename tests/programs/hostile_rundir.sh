#!/bin/sh
# By body:
# rm:    removes the directory of its run files, exits 0.
# carry: attempt 1 checkpoints {"carried": true} and exits 75; later attempts copy the checkpoint they were
#        given to $PROG_OUT/<message id> and exit 0.
# wait:  removes the directory of its run files, records its pid in $PROG_OUT/<message id>.pid and waits;
#        on SIGTERM writes $PROG_OUT/<message id>.term and exits 75.
body=$(cat)
case "$body" in
  rm) rm -rf "$(dirname "$SPOT_CHECKPOINT_FILE")" ;;
  carry)
    if [ "$SPOT_DEQUEUE_COUNT" -ge 2 ]; then
      cat "$SPOT_CHECKPOINT_FILE" > "$PROG_OUT/$SPOT_MESSAGE_ID"
      exit 0
    fi
    printf '{"carried": true}' > "$SPOT_CHECKPOINT_FILE"
    sleep 1.5
    exit 75 ;;
  wait)
    rm -rf "$(dirname "$SPOT_CHECKPOINT_FILE")"
    trap 'echo stopped > "$PROG_OUT/$SPOT_MESSAGE_ID.term"; exit 75' TERM
    echo $$ > "$PROG_OUT/$SPOT_MESSAGE_ID.pid"
    while :; do sleep 0.1; done ;;
esac
exit 0
