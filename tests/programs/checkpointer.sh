#!/bin/sh
# Attempt 1: writes its body (or, for "large", a 70 kB JSON string) as the checkpoint and exits 75.
# Later attempts: copy the checkpoint they were given (or "none") to $PROG_OUT/<message id>, exit 0.
body=$(cat)
if [ "$SPOT_DEQUEUE_COUNT" -ge 2 ]; then
  if [ -e "$SPOT_CHECKPOINT_FILE" ]; then cat "$SPOT_CHECKPOINT_FILE"; else echo none; fi > "$PROG_OUT/$SPOT_MESSAGE_ID"
  exit 0
fi
case "$body" in
  large) { printf '"'; head -c 70000 /dev/zero | tr '\0' 'a'; printf '"'; } > "$SPOT_CHECKPOINT_FILE.tmp" ;;
  *) printf '%s' "$body" > "$SPOT_CHECKPOINT_FILE.tmp" ;;
esac
mv "$SPOT_CHECKPOINT_FILE.tmp" "$SPOT_CHECKPOINT_FILE"
exit 75
