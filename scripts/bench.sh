#!/usr/bin/env bash
# Every benchmark, one after the other (they share the cores, so never in
# parallel), then the plots. Numbers go to bench/results/<name>.{json,txt},
# plots to docs/img/. Takes about 30 minutes on 2 cores; --quick about 11.
#   scripts/bench.sh [--quick]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/scripts/setup.sh" test,bench
cd "$repo"  # bench/ is a package: each benchmark runs as python -m bench.<name>
py="$repo/.venv/bin/python"
mkdir -p bench/results

if [ "${1:-}" = "--quick" ]; then
  throughput=(--scale 0.3 --repeat 1); latency=(--scale 0.5); scaling=(--messages 200 --repeat 1)
  eviction=(--rounds 5); chaos=(--messages 300 --cycles 10); program=(--repeat 1); cpu=(--repeat 1)
else
  throughput=(); latency=(); scaling=(); eviction=(); chaos=(); program=(); cpu=(--profile)
fi

run() {  # run <name> <module> [args...]: print and keep the output; a failing benchmark fails the whole run
  local name="$1" module="$2"; shift 2
  echo "== $name" >&2
  "$py" -m "bench.$module" "$@" 2>&1 | tee "bench/results/$name.txt"
}

run azurite_depth azurite_depth
run throughput throughput "${throughput[@]}"
run latency latency "${latency[@]}"
run cpu cpu "${cpu[@]}"
run scaling scaling "${scaling[@]}"
run eviction_timing eviction_timing "${eviction[@]}"
run chaos chaos "${chaos[@]}"
run chaos_celery chaos --tool celery --mode kill --json bench/results/chaos_celery.json "${chaos[@]}"
run program_overhead program_overhead "${program[@]}"
"$py" -m bench.plots
