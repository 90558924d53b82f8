#!/usr/bin/env bash
# Every benchmark, one after the other (they share the cores, so never in
# parallel), then the plots. Numbers go to bench/results/<name>.{json,txt},
# plots to docs/img/. Takes about 15 minutes on 2 cores; --quick about 4.
#   scripts/bench.sh [--quick]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh" test,bench
cd "$repo/bench"
py="$repo/.venv/bin/python"
mkdir -p results

if [ "${1:-}" = "--quick" ]; then
  throughput=(--scale 0.3 --repeat 1); scaling=(--messages 200 --repeat 1)
  eviction=(--rounds 5); chaos=(--messages 300 --cycles 10); program=(--repeat 1)
else
  throughput=(); scaling=(); eviction=(); chaos=(); program=()
fi

run() {  # run <name> <script> [args...]: print and keep the output; a failing benchmark fails the whole run
  local name="$1"; shift
  echo "== $name" >&2
  "$py" "$@" 2>&1 | tee "results/$name.txt"
}

run azurite_depth azurite_depth.py
run throughput throughput.py "${throughput[@]}"
run scaling scaling.py "${scaling[@]}"
run eviction_timing eviction_timing.py "${eviction[@]}"
run chaos chaos.py "${chaos[@]}"
run chaos_celery chaos.py --tool celery --mode kill --json results/chaos_celery.json "${chaos[@]}"
run program_overhead program_overhead.py "${program[@]}"
"$py" plots.py
