"""Throughput side by side: the bare SDK loop, spot-supervisor and Celery, same messages, same process count.

    .venv/bin/python -m bench.throughput [--processes 2] [--repeat 3] [--workloads noop,cpu20,io200]

For each workload (no-op, 20 ms of CPU, 200 ms of I/O wait) each tool gets a
fresh queue with the same message bodies and the same number of processes:

- bare:   N processes of bench/bare_loop.py (receive 32, run, delete; the floor the queue sets)
- ours:   `spot-supervisor run` with N scale-out workers
- celery: `celery worker --pool prefork --concurrency N`, kombu's Azure Storage Queues transport

Rate = messages / (last handler end − first handler start), from the
completion log every handler appends to, so start-up is left out the same way
for every tool. Requests are every HTTP request the tool's processes sent
(bench/counting) until the queue was empty, divided by the messages. Memory is
sampled while the tool runs: the parent's RSS, a worker's RSS, and the PSS of
the whole process tree (shared pages counted once).

For I/O two more rows show what one would configure for waiting work: ours in
scale-up mode (its default 4 threads per core) and Celery's thread pool with
as many threads, one process each.

Order alternates between repeats; the best run of each row is reported. Prints
numbers and writes bench/results/throughput.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CompletionLog,
    approximate_count,
    azurite,
    child_env,
    counted,
    fill,
    new_queue,
    request_count,
    save,
    spawn,
    stop_tree,
    tree_memory,
    wait_until_empty,
)

BIN = Path(sys.executable).parent
# Azurite (not Azure) slows down as a queue gets deeper: Get Messages took ~4 ms at 10 messages, 13 ms at 2,000
# and 37 ms at 4,000 here (bench/azurite_depth.py), which would hide the tools behind it. So queues stay ≤ 600 deep.
MESSAGES = {"noop": 600, "cpu20": 600, "io200": 100, "sleep20": 300}
IO_THREADS_PER_CORE = 4  # spot-supervisor's scale-up default
BARE_BATCH = {"noop": 32, "cpu20": 32, "io200": 10, "sleep20": 32}  # 10: about 2 s of work per receive, as a careful user would pick


@dataclass(frozen=True)
class Setup:
    tool: str  # bare | ours | celery
    workload: str
    processes: int
    threads: int = 1  # per process

    @property
    def label(self) -> str:
        shape = f"{self.processes} proc" if self.threads == 1 else f"{self.processes} proc x {self.threads} threads"
        return f"{self.tool} ({shape})"


@dataclass(frozen=True)
class Run:
    setup: Setup
    messages: int
    seconds: float
    rate: float
    requests: int
    requests_per_message: float
    parent_rss_mb: float
    worker_rss_mb: float
    tree_pss_mb: float
    processes_seen: int


class MemorySampler:
    """Samples the process tree every 0.25 s; keeps the sample with the largest total PSS."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.25):
            try:
                sample = tree_memory(self.pid)
            except psutil.Error:
                continue  # a process of the tree exited while being read
            if sample["tree_pss_mb"] > self.peak.get("tree_pss_mb", 0.0):
                self.peak = sample


def start_tool(setup: Setup, conn: str, queue: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    if setup.tool == "bare":
        env = {**env, "BENCH_CONNECTION": conn, "BENCH_QUEUE": queue}
        argv = [sys.executable, "-m", "bench.bare_loop", setup.workload, "--processes", str(setup.processes),
                "--batch", str(BARE_BATCH[setup.workload])]
    elif setup.tool == "ours":
        env = {**env, "SPOT_QUEUE_CONNECTION_STRING": conn, "SPOT_QUEUE_NAME": queue, "SPOT_EVENTS_SOURCE": "none",
               "SPOT_WORKLOAD_HANDLER": f"bench.workloads:{setup.workload}", "SPOT_TELEMETRY_LOG_LEVEL": "WARNING"}
        if setup.threads > 1:  # scale-up sizes by CPU: threads_per_core × the CPUs this process may use
            per_core = max(1, setup.threads // len(os.sched_getaffinity(0)))
            env.update(SPOT_WORKLOAD_MODE="scale-up", SPOT_SCALING_THREADS_PER_CORE=str(per_core))
        else:
            env["SPOT_SCALING_WORKERS"] = str(setup.processes)
        argv = [str(BIN / "spot-supervisor"), "run"]
    else:
        from bench.celery_app import broker_url

        env = {**env, "BENCH_BROKER": broker_url(conn), "BENCH_QUEUE": queue}
        pool = ["--pool", "threads", "--concurrency", str(setup.threads)] if setup.threads > 1 else \
            ["--pool", "prefork", "--concurrency", str(setup.processes)]
        argv = [str(BIN / "celery"), "-A", "bench.celery_app", "worker", *pool, "--without-mingle", "--without-gossip",
                "--without-heartbeat", "--loglevel", "WARNING"]
    return spawn(argv, env, log)


def enqueue(setup: Setup, conn: str, queue: str, bodies: list[str]) -> Any:
    """A new queue holding the bodies, as the tool wants them; returns its client."""
    client = new_queue(conn, queue)
    if setup.tool != "celery":
        fill(client, bodies)
        return client
    from bench.celery_app import send_tasks

    send_tasks(conn, queue, setup.workload, bodies)
    if (count := approximate_count(client)) != len(bodies):
        raise RuntimeError(f"enqueued {count} Celery tasks of {len(bodies)}")
    return client


def measure(setup: Setup, workdir: Path, n: int) -> Run:
    """One run on a fresh Azurite. A long-lived one froze for 15 s mid-run here, at its garbage collection
    (every 60 s, slow in the number of messages deleted since); a new emulator per run never gets that far."""
    with azurite(workdir) as conn:
        return measure_on(setup, conn, workdir, n)


def measure_on(setup: Setup, conn: str, workdir: Path, n: int) -> Run:
    queue = f"bench{uuid.uuid4().hex[:12]}"
    bodies = [f"{setup.workload}-{i:06d}" for i in range(n)]
    client = enqueue(setup, conn, queue, bodies)
    done = CompletionLog(workdir / f"{queue}.done")
    requests = workdir / f"{queue}.requests"
    env = counted(child_env(BENCH_DONE=str(done.path)), requests)
    proc = start_tool(setup, conn, queue, env, workdir / f"{queue}.log")
    try:
        with MemorySampler(proc.pid) as memory:
            done.wait_for(n, timeout=60 + n * 0.5 / setup.processes, alive=proc if setup.tool != "bare" else None)
            wait_until_empty(client)
            sent = request_count(requests)
    finally:
        stop_tree(proc, signal.SIGTERM if setup.tool != "celery" else signal.SIGQUIT)
    seconds = done.seconds_for_all(n, setup.label)
    peak = memory.peak or {"parent_rss_mb": 0.0, "worker_rss_mb": 0.0, "tree_pss_mb": 0.0, "processes": 0}
    return Run(setup, n, seconds, n / seconds, sent, sent / n, peak["parent_rss_mb"], peak["worker_rss_mb"],
               peak["tree_pss_mb"], int(peak["processes"]))


def setups(workloads: list[str], processes: int) -> list[Setup]:
    rows = [Setup(tool, workload, processes) for workload in workloads for tool in ("bare", "ours", "celery")]
    if "io200" in workloads:
        threads = IO_THREADS_PER_CORE * len(os.sched_getaffinity(0))
        rows += [Setup("ours", "io200", 1, threads), Setup("celery", "io200", 1, threads)]
    return rows


def print_row(run: Run, floor: float | None, celery: float | None) -> None:
    vs_floor = f"{run.rate / floor:6.0%}" if floor else "     -"
    vs_celery = f"{run.rate / celery:5.2f}x" if celery else "     -"
    print(f"{run.setup.workload:<6} {run.setup.label:<30} {run.rate:8.1f} {vs_floor:>8} {vs_celery:>8} {run.requests_per_message:9.3f} "
          f"{run.parent_rss_mb:9.1f} {run.worker_rss_mb:9.1f} {run.tree_pss_mb:9.1f}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=2, help="processes per tool (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the fastest is reported")
    parser.add_argument("--workloads", default="noop,cpu20,io200")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts (0.1 for a quick look)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/throughput.json)")
    args = parser.parse_args()
    workloads = args.workloads.split(",")
    rows = setups(workloads, args.processes)
    runs: dict[Setup, list[Run]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as tmp:
        for repeat in range(args.repeat):
            for row in rows if repeat % 2 == 0 else rows[::-1]:
                n = max(10, round(MESSAGES[row.workload] * args.scale * (4 if row.threads > 1 else 1)))
                run = measure(row, Path(tmp), n)
                runs[row].append(run)
                print(f"  run {repeat + 1}: {row.workload:<6} {row.label:<30} {run.rate:8.1f} msg/s, "
                      f"{run.requests_per_message:.3f} req/msg", flush=True)
    best = {row: max(found, key=lambda r: r.rate) for row, found in runs.items()}
    print(f"\n{'load':<6} {'tool':<30} {'msg/s':>8} {'vs bare':>8} {'vs celery':>8} {'req/msg':>9} "
          f"{'parent MB':>9} {'worker MB':>9} {'tree PSS':>9}")
    for row in rows:
        floor = best.get(Setup("bare", row.workload, args.processes))
        celery = best.get(Setup("celery", row.workload, row.processes, row.threads))
        print_row(best[row], floor.rate if floor and row.threads == 1 else None, celery.rate if celery else None)
    save("throughput", {"processes": args.processes, "repeat": args.repeat,
                        "best": [asdict(best[row]) for row in rows],
                        "runs": [asdict(r) for found in runs.values() for r in found]}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
