#!/usr/bin/env bash
# System tools the packaging tests use when present: systemd-analyze (unit
# verify and security) and shellcheck (orchestrate.sh, build scripts).
# Installs what is missing with apt-get when run as root; otherwise, or when
# apt-get fails, says so and exits 0: those tests then skip. Idempotent.
set -euo pipefail

missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v shellcheck >/dev/null 2>&1 || missing+=(shellcheck)
((${#missing[@]})) || exit 0

if ((EUID != 0)) || ! command -v apt-get >/dev/null 2>&1; then
  echo "ci-deps: cannot install ${missing[*]} (needs root and apt-get); their tests will skip" >&2
  exit 0
fi
echo "ci-deps: apt-get install ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; }; then
  echo "ci-deps: apt-get failed; the tests that need ${missing[*]} will skip" >&2
fi
