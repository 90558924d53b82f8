"""Throughput and footprint of `spot-supervisor run` against a local Azurite.

    .venv/bin/python bench/supervisor_throughput.py [--messages 2000] [--cpu-messages 1000] [--workers 1,2,4]

For each handler (a no-op, and 20 ms of CPU per message) and each worker count:
enqueue the messages, start the supervisor, and time from "ready" (every worker
running) until the queue is empty (every message deleted). Then, with an empty
queue, the supervisor's RSS and its CPU use over ~10 s.

Prints numbers only; asserts nothing. Azurite runs on the same machine and
takes CPU of its own: on a small VM it, not the supervisor, bounds the no-op rate.

This file is also the handler module the workers import ("supervisor_throughput:noop").
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
SUPERVISOR = str(Path(sys.executable).with_name("spot-supervisor"))


# --- handlers (imported by the workers) ----------------------------------------------------------------


def noop(message: Any, ctx: Any) -> None:
    return None


def cpu20(message: Any, ctx: Any) -> None:
    """20 ms of CPU time (hashing), no checkpoint."""
    import hashlib

    digest = message.body.encode()
    until = time.thread_time() + 0.020
    while time.thread_time() < until:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()


# --- the benchmark ------------------------------------------------------------------------------------


def supervisor_env(conn: str, queue_name: str, handler: str, **spot: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_") and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update({"SPOT_QUEUE_CONNECTION_STRING": conn, "SPOT_QUEUE_NAME": queue_name, "SPOT_EVENTS_SOURCE": "none",
                "SPOT_WORKLOAD_HANDLER": handler, "PYTHONPATH": os.pathsep.join([str(BENCH), str(REPO)])})
    env.update({f"SPOT_{k.upper()}": v for k, v in spot.items()})
    return env


def enqueue(client: Any, n: int) -> float:
    started = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda i: client.send_message(f"message {i}"), range(n)))
    return time.perf_counter() - started


def wait_for_line(log: Path, text: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.01)
    raise TimeoutError(f"no {text!r} in {log} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def drain_rate(conn: str, workdir: Path, handler: str, workers: int, n: int) -> dict[str, float]:
    from azure.storage.queue import QueueClient

    name = f"bench{uuid.uuid4().hex[:12]}"
    client = QueueClient.from_connection_string(conn, name)
    client.create_queue()
    enqueue_s = enqueue(client, n)
    log = workdir / f"{name}.log"
    with log.open("wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen([SUPERVISOR, "run"], env=supervisor_env(conn, name, handler, scaling_workers=str(workers),
                                                                       queue_idle_poll_max_s="0.5"),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            ready = wait_for_line(log, "ready: ", 60)
            while (client.get_queue_properties().approximate_message_count or 0) > 0:
                time.sleep(0.05)
            empty = time.monotonic()
        finally:
            stop(proc)
    client.delete_queue()
    return {"enqueue_s": enqueue_s, "startup_s": ready - started, "drain_s": empty - ready, "rate": n / (empty - ready)}


def on_cpu_s(pid: int) -> float | None:
    """Time on CPU in seconds, to the nanosecond (/proc/<pid>/schedstat sums every thread of the process)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def idle_footprint(conn: str, workdir: Path, workers: int, seconds: float) -> dict[str, float]:
    import psutil
    from azure.storage.queue import QueueClient

    name = f"bench{uuid.uuid4().hex[:12]}"
    QueueClient.from_connection_string(conn, name).create_queue()
    log = workdir / f"{name}-idle.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([SUPERVISOR, "run"], env=supervisor_env(conn, name, "supervisor_throughput:noop",
                                                                       scaling_workers=str(workers)),
                                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            wait_for_line(log, "ready: ", 60)
            time.sleep(6.0)  # let the workers' empty-queue polling back off to its steady state
            sup = psutil.Process(proc.pid)
            kids = sup.children()
            before = sup.cpu_times()
            precise_before = on_cpu_s(proc.pid)
            kids_before = [k.cpu_times() for k in kids]
            t0 = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - t0
            after = sup.cpu_times()
            precise_after = on_cpu_s(proc.pid)
            kids_after = [k.cpu_times() for k in kids]
            if precise_before is not None and precise_after is not None:
                sup_cpu = (precise_after - precise_before) / elapsed * 100
            else:
                sup_cpu = (after.user + after.system - before.user - before.system) / elapsed * 100
            worker_cpu = max(0.0, sum(a.user + a.system - b.user - b.system for a, b in zip(kids_after, kids_before)) / elapsed * 100)
            mem = sup.memory_full_info()
            worker_rss = [k.memory_info().rss for k in kids]
        finally:
            stop(proc)
    return {"sup_rss_mb": mem.rss / 2**20, "sup_uss_mb": mem.uss / 2**20, "sup_cpu_pct": sup_cpu,
            "worker_rss_mb": sum(worker_rss) / len(worker_rss) / 2**20, "workers_cpu_pct": worker_cpu,
            "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages per no-op run")
    parser.add_argument("--cpu-messages", type=int, default=1000, help="messages per 20 ms CPU run")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is shown (a shared machine is noisy)")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]

    sys.path.insert(0, str(REPO / "scripts"))
    import psutil
    from local_azurite import connection_string, free_port, start_azurite
    from local_azurite import stop as stop_azurite

    print(f"machine: {len(os.sched_getaffinity(0))} CPUs, Python {sys.version.split()[0]}, psutil {psutil.__version__}, "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        with (workdir / "azurite.log").open("wb") as azlog:
            azurite = start_azurite(port, workdir, azlog)
            try:
                conn = connection_string(port)
                print(f"{'handler':<10} {'workers':>7} {'messages':>8} {'startup s':>9} {'drain s':>8} {'msg/s':>8} {'enqueue s':>9}")
                for handler, n in (("noop", args.messages), ("cpu20", args.cpu_messages)):
                    for workers in worker_counts:
                        runs = [drain_rate(conn, workdir, f"supervisor_throughput:{handler}", workers, n)
                                for _ in range(max(1, args.repeat))]
                        r = max(runs, key=lambda run: run["rate"])
                        print(f"{handler:<10} {workers:>7} {n:>8} {r['startup_s']:>9.2f} {r['drain_s']:>8.2f} "
                              f"{r['rate']:>8.1f} {r['enqueue_s']:>9.2f}", flush=True)
                for workers in (1, 2):
                    f = idle_footprint(conn, workdir, workers, args.idle_seconds)
                    print(f"idle, {workers} worker(s), empty queue, {f['seconds']:.1f} s: supervisor RSS {f['sup_rss_mb']:.1f} MB "
                          f"(USS {f['sup_uss_mb']:.1f} MB), supervisor CPU {f['sup_cpu_pct']:.3f}%; "
                          f"per-worker RSS {f['worker_rss_mb']:.1f} MB, all workers CPU {f['workers_cpu_pct']:.2f}%", flush=True)
            finally:
                stop_azurite(azurite)
    print(f"load average at the end: {os.getloadavg()[0]:.2f} (1 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
