#!/usr/bin/env bash
# The main job, end to end on local defaults: Azurite + IMDS simulator +
# spot-supervisor, 100 messages, a simulated eviction mid-run, a summary.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
exec "$repo/.venv/bin/python" "$repo/scripts/demo.py" "$@"
