#!/usr/bin/env bash
# The main job, end to end on local defaults: Azurite + IMDS simulator +
# spot-supervisor, 100 messages, a simulated eviction mid-run, a summary.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
cd "$repo"  # run as a module from the repo root, so it imports testsupport/ like the tests and bench do
if [[ " $* " == *" --fleet "* ]]; then
  # The fleet keeper's story: scale sets (ARM stand-in), evictions restored, idle VMs retired.
  exec "$repo/.venv/bin/python" -m scripts.demo_fleet
fi
exec "$repo/.venv/bin/python" -m scripts.demo "$@"
