"""Per-message cost of a program as the handler: `true` (one process per message) against a
Python no-op handler, both under `spot-supervisor run` with the same worker count.

    .venv/bin/python -m bench.program_overhead [--messages 600] [--workers 2] [--repeat 3]

Each run gets a fresh Azurite and a full queue, then the supervisor; the rate is
measured from the queue itself (approximate message count, polled every 20 ms):
from the first message deleted to the last, so start-up is not counted. Prints
msgs/s per run and the median, and the cost of one run of `true` measured in-process
without the queue; writes bench/results/program_overhead.json.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import approximate_count, azurite, child_env, fill, new_queue, save, spawn, stop_tree

BIN = Path(sys.executable).parent
SETUPS = {"program true": {"SPOT_WORKLOAD_COMMAND": "true"},
          "python no-op": {"SPOT_WORKLOAD_HANDLER": "bench.program_overhead:noop"}}


def noop(message: Any, ctx: Any) -> None:
    """The Python handler measured against `true`: does nothing at all."""


class _IdleContext:
    """What ProgramHandler reads of a Context, for a run that checkpoints nothing and is never drained."""

    state = None
    draining = False
    deadline = None
    message_id = "local"


def local_cost_ms(runs: int) -> float:
    """Milliseconds per ProgramHandler run of `true` in this process: the program's share alone, no queue."""
    from worker.message import Message
    from worker.programs.runner import ProgramHandler

    handler = ProgramHandler(["true"], signal.SIGTERM, 0.0)
    message = Message("local", "body", 1, None)
    try:
        started = time.perf_counter()
        for _ in range(runs):
            handler(message, _IdleContext())  # type: ignore[arg-type]
        return 1000 * (time.perf_counter() - started) / runs
    finally:
        handler.close()


def measure(name: str, workdir: Path, n: int, workers: int) -> float:
    with azurite(workdir) as conn:
        queue = f"bench{uuid.uuid4().hex[:12]}"
        client = new_queue(conn, queue)
        fill(client, [f"m{i:06d}" for i in range(n)])
        env = child_env(SPOT_QUEUE_CONNECTION_STRING=conn, SPOT_QUEUE_NAME=queue, SPOT_EVENTS_SOURCE="none",
                        SPOT_SCALING_WORKERS=str(workers), SPOT_TELEMETRY_LOG_LEVEL="WARNING", **SETUPS[name])
        proc = spawn([str(BIN / "spot-supervisor"), "run"], env, workdir / f"{queue}.log")
        try:
            first = last = None
            at_first = n
            give_up = time.monotonic() + 120 + n * 0.1
            while time.monotonic() < give_up:
                count = approximate_count(client)
                now = time.monotonic()
                if first is None and count < n:
                    first, at_first = now, count
                if count == 0:
                    last = now
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"{name}: the supervisor exited ({proc.returncode}); see {workdir}/{queue}.log")
                time.sleep(0.02)
            if first is None or last is None:
                raise RuntimeError(f"{name}: the queue was not emptied in time; see {workdir}/{queue}.log")
        finally:
            stop_tree(proc, signal.SIGTERM)
        return at_first / (last - first) if last > first else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="results file (default bench/results/program_overhead.json)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="program-overhead-"))
    results: dict[str, Any] = {"messages": args.messages, "workers": args.workers, "runs": {}}
    try:
        for _ in range(args.repeat):
            for name in SETUPS:  # interleaved, so a slow moment of the machine hits both
                rate = measure(name, workdir, args.messages, args.workers)
                results["runs"].setdefault(name, []).append(rate)
                print(f"{name:14s} {rate:8.1f} msgs/s", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {name: statistics.median(rates) for name, rates in results["runs"].items()}
    results["median_msgs_per_s"] = medians
    per_message_ms = 1000 * args.workers * (1 / medians["program true"] - 1 / medians["python no-op"])
    results["program_cost_ms_per_message_per_worker"] = per_message_ms
    results["local_ms_per_run_of_true"] = local = local_cost_ms(200)
    for name, rate in medians.items():
        print(f"median {name:14s} {rate:8.1f} msgs/s ({args.workers} workers, {args.messages} messages)")
    print(f"a program run costs about {per_message_ms:.1f} ms of a worker's time per message over a Python call")
    print(f"in-process, without the queue: {local:.1f} ms per run of `true` (start, stdin, output pipes, exit)")
    save("program_overhead", results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
