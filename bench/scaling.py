"""CPU-bound scaling: 20 ms of CPU per message at 1, 2, 4 workers, and the efficiency against perfect scaling.

    .venv/bin/python -m bench.scaling [--workers 1,2,4] [--messages 600] [--tools ours,bare] [--repeat 2]

Efficiency at n workers = rate(n) / (min(n, CPUs) × rate(1)): perfect scaling up
to the core count, flat beyond it. The bare SDK loop runs the same rows, so a
shortfall can be told apart from the machine's own (Azurite and the benchmark
share these cores). The ideal rate is 50 msg/s per busy core.
Writes bench/results/scaling.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from bench.common import save
from bench.throughput import Run, Setup, measure


def efficiency(rate: float, workers: int, single: float, cpus: int) -> float:
    return rate / (min(workers, cpus) * single)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--tools", default="ours,bare")
    parser.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is reported")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/scaling.json)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    tools = args.tools.split(",")
    cpus = len(os.sched_getaffinity(0))
    rows = [Setup(tool, "cpu20", n) for n in counts for tool in tools]
    runs: dict[Setup, list[Run]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as tmp:
        for repeat in range(args.repeat):
            for row in rows if repeat % 2 == 0 else rows[::-1]:
                run = measure(row, Path(tmp), args.messages)
                runs[row].append(run)
                print(f"  run {repeat + 1}: {row.label:<16} {run.rate:7.1f} msg/s", flush=True)
    best = {row: max(found, key=lambda r: r.rate) for row, found in runs.items()}
    table = []
    print(f"\n{cpus} CPUs; 20 ms of CPU per message (ideal 50 msg/s per busy core)")
    print(f"{'tool':<6} {'workers':>7} {'msg/s':>8} {'efficiency':>10} {'of ideal':>9}")
    for row in rows:
        single = best[Setup(row.tool, "cpu20", 1)].rate if 1 in counts else best[row].rate / row.processes
        rate = best[row].rate
        eff = efficiency(rate, row.processes, single, cpus)
        of_ideal = rate / (50.0 * min(row.processes, cpus))
        table.append({"tool": row.tool, "workers": row.processes, "rate": rate, "efficiency": eff, "of_ideal": of_ideal})
        print(f"{row.tool:<6} {row.processes:>7} {rate:8.1f} {eff:10.0%} {of_ideal:9.0%}")
    save("scaling", {"cpus": cpus, "messages": args.messages, "rows": table,
                     "runs": [asdict(r) for found in runs.values() for r in found]}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
