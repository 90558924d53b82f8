#!/bin/sh
# Exit status by body: ok → 0; release → 75 until the 4th attempt, then 0; fail → 3; killed → SIGKILL itself.
# Appends "<id> <dequeue count> <body>" to $PROG_EVENTS per run.
body=$(cat)
echo "$SPOT_MESSAGE_ID $SPOT_DEQUEUE_COUNT $body" >> "$PROG_EVENTS"
case "$body" in
  ok) exit 0 ;;
  release) if [ "$SPOT_DEQUEUE_COUNT" -ge 4 ]; then exit 0; fi; exit 75 ;;
  fail) echo "failing on purpose" >&2; exit 3 ;;
  killed) kill -KILL $$ ;;
  slow) sleep 30 ;;
esac
exit 9
