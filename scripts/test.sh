#!/usr/bin/env bash
# The test command: set up, then run the whole suite against a real Azurite.
# Extra arguments go to pytest, e.g. scripts/test.sh -k worker -x
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh"
bash "$repo/scripts/ci-deps.sh"
cd "$repo"
if [ $# -eq 0 ]; then  # the full run also lints and type-checks; a focused run (with pytest args) does not
  .venv/bin/ruff check -q worker supervisor scripts bench tests testsupport
  .venv/bin/mypy
fi
exec .venv/bin/python -m pytest "$@"
