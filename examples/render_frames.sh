#!/bin/sh
# A program as a spot-supervisor handler (see "Plugging in your work" in README.md):
#   [workload]
#   command = "/path/to/examples/render_frames.sh"
#
# The message body (standard input) is a number of frames to "render", e.g. 40.
# Each frame takes RENDER_FRAME_S seconds (default 1). After every frame the
# program checkpoints {"next_frame": N} to $SPOT_CHECKPOINT_FILE (a temporary
# file, then a rename), so a later attempt, on any VM, resumes from there.
# A drain sends SIGTERM: the program stops at once, keeps the frames it has,
# and exits 75 ("not done, not failed": the message goes back on the queue).
# Set RENDER_LOG to a file to append "<message id> <frame> <pid>" per frame.
set -eu

frames=$(cat)
case "$frames" in
  ''|*[!0-9]*) echo "the body must be a number of frames, got: $frames" >&2; exit 2 ;;
esac

next=0
if [ -s "$SPOT_CHECKPOINT_FILE" ]; then
  next=$(sed -n 's/.*"next_frame": *\([0-9][0-9]*\).*/\1/p' "$SPOT_CHECKPOINT_FILE")
  echo "resuming at frame $next (attempt $SPOT_DEQUEUE_COUNT)"
fi

stopping=0
trap 'stopping=1' TERM

while [ "$next" -lt "$frames" ]; do
  if [ "$stopping" = 1 ]; then
    # SPOT_DEADLINE_FILE exists once a drain began: the deadline in Unix seconds.
    left=$(( $(cat "$SPOT_DEADLINE_FILE") - $(date +%s) ))
    echo "drain: stopping at frame $next of $frames, ${left}s before the deadline"
    exit 75
  fi
  sleep "${RENDER_FRAME_S:-1}" &
  if ! wait "$!"; then  # interrupted by SIGTERM: this frame is not done
    kill "$!" 2>/dev/null || true
    continue
  fi
  if [ -n "${RENDER_LOG:-}" ]; then echo "$SPOT_MESSAGE_ID $next $$" >> "$RENDER_LOG"; fi
  next=$((next + 1))
  printf '{"next_frame": %d}\n' "$next" > "$SPOT_CHECKPOINT_FILE.tmp"
  mv "$SPOT_CHECKPOINT_FILE.tmp" "$SPOT_CHECKPOINT_FILE"
done
echo "rendered $frames frames"
