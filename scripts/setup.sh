#!/usr/bin/env bash
# Idempotent development set-up: .venv with the package (editable) and its
# extras (default "test"; scripts/bench.sh asks for "test,bench"), Azurite from
# package-lock.json into ./node_modules. Called by the other scripts; safe to
# run on its own.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$python" --version 2>&1)" >&2
  "$python" -m venv .venv
fi
extras="${1:-test}"
stamp=".venv/.spot-installed-${extras//,/-}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e .[$extras]" >&2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  touch "$stamp"
fi
if [ ! -x node_modules/.bin/azurite-queue ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci (Azurite, pinned in package-lock.json)" >&2
  npm ci --no-audit --no-fund --loglevel=error >&2
fi
