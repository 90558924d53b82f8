#!/bin/sh
# Replaces its checkpoint file by what its body names (fifo: a FIFO; dev_zero: a symlink to /dev/zero;
# huge: a sparse 2 GiB file), records its pid in $PROG_OUT/<message id>.pid, stays past the worker's
# once-a-second look at the file, then exits 0. Any other body: exit 0 at once.
body=$(cat)
case "$body" in
  fifo) rm -f "$SPOT_CHECKPOINT_FILE"; mkfifo "$SPOT_CHECKPOINT_FILE" ;;
  dev_zero) ln -sf /dev/zero "$SPOT_CHECKPOINT_FILE" ;;
  huge) truncate -s 2G "$SPOT_CHECKPOINT_FILE" ;;
  *) exit 0 ;;
esac
echo $$ > "$PROG_OUT/$SPOT_MESSAGE_ID.pid"
sleep 2.5
exit 0
