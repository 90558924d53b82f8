"""Eviction timing over N simulated evictions, and messages lost (must be 0).

Per round: a supervisor with 2 workers on a queue of sample messages (checkpointing
CPU work), an eviction notice from the IMDS simulator once work is under way, then
the supervisor drains, acknowledges and exits. At the end a supervisor without
events finishes the queue and every message id must have completed.

Prints p50/p95 of: notice → every worker stopped receiving, drain start → every
worker stopped receiving, last worker exit → acknowledgement, notice → acknowledgement.
Run: .venv/bin/python bench/eviction_timing.py [--rounds 20] [--poll 1.0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from azure.storage.queue import QueueClient

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

from local_azurite import connection_string, free_port, start_azurite, stop  # noqa: E402

from supervisor.imds_simulator import ImdsSimulator  # noqa: E402

STAMP = r"(\d\d:\d\d:\d\d\.\d\d\d)"


def log_time(line: str) -> float:
    """Epoch seconds of a log line's HH:MM:SS.mmm stamp (today, local time)."""
    stamp = re.match(STAMP, line)
    assert stamp, line
    today = datetime.now().strftime("%Y-%m-%d")
    return datetime.strptime(f"{today} {stamp.group(1)}", "%Y-%m-%d %H:%M:%S.%f").timestamp()


def find(log: str, pattern: str) -> re.Match[str]:
    match = re.search(pattern, log, re.MULTILINE)
    if match is None:
        raise AssertionError(f"{pattern!r} not in supervisor log:\n{log[-2000:]}")
    return match


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def completed(results: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--poll", type=float, default=1.0, help="events.poll_interval_s (default 1, as shipped)")
    parser.add_argument("--messages", type=int, default=30, help="added per round")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spot-bench-evict-"))
    port = free_port()
    azurite = start_azurite(port, work, (work / "azurite.log").open("wb"))
    sim = ImdsSimulator(vm_name="vm-spot-07").start()
    queue = QueueClient.from_connection_string(connection_string(port), "bench-evict")
    queue.create_queue()
    results = work / "results.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update(SPOT_QUEUE_CONNECTION_STRING=connection_string(port), SPOT_QUEUE_NAME="bench-evict",
               SPOT_SCALING_WORKERS="2", SPOT_EVENTS_SOURCE="azure", SPOT_EVENTS_ENDPOINT=sim.url,
               SPOT_EVENTS_POLL_INTERVAL_S=str(args.poll), SPOT_SAMPLE_RESULTS=str(results), PYTHONUNBUFFERED="1")
    notice_to_stopped, drain_to_stopped, exit_to_ack, notice_to_ack = [], [], [], []
    enqueued = 0
    try:
        for round_no in range(args.rounds):
            for _ in range(args.messages):
                queue.send_message(json.dumps({"n": enqueued, "chunks": 10, "chunk_ms": 20}))
                enqueued += 1
            log_path = work / f"round-{round_no}.log"
            with log_path.open("wb") as fh:
                proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], env=env, stderr=fh, cwd=REPO)
                before = len(completed(results))
                deadline = time.time() + 60
                while len(completed(results)) < before + 2 and time.time() < deadline:
                    time.sleep(0.02)
                time.sleep(random.uniform(0, args.poll))  # the notice lands anywhere in the poll cycle
                notice = sim.simulate_eviction(delay_s=30)
                noticed_at = time.time()
                code = proc.wait(60)
            log = log_path.read_text()
            assert code == 0, log[-2000:]
            drain_line = find(log, r"^.*drain \(Preempt.*$").group(0)
            stopped = float(find(log, r"every worker stopped receiving ([\d.]+)s after the notice").group(1))
            acked = float(find(log, r"acknowledged \S+ ([\d.]+)s after the last worker exited").group(1))
            ack_time = sim.acks()[-1]["time"]
            assert sim.acks()[-1]["body"] == {"StartRequests": [{"EventId": notice["EventId"]}]}
            drain_started = log_time(drain_line)
            drain_to_stopped.append(stopped)
            notice_to_stopped.append(max(0.0, drain_started - noticed_at) + stopped)
            exit_to_ack.append(acked)
            notice_to_ack.append(ack_time - noticed_at)
            sim.reset()
            print(f"round {round_no + 1:2d}: notice→stopped {notice_to_stopped[-1]:.3f}s, last exit→ack {acked * 1000:.1f} ms, "
                  f"notice→ack {notice_to_ack[-1]:.3f}s, done so far {len({r['id'] for r in completed(results)})}", flush=True)

        # Finish everything on a "replacement VM" and count.
        finish_env = {**env, "SPOT_EVENTS_SOURCE": "none"}
        with (work / "finish.log").open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], env=finish_env, stderr=fh, cwd=REPO)
            deadline = time.time() + 600
            while len({r["id"] for r in completed(results)}) < enqueued and time.time() < deadline:
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        records = completed(results)
        unique = {r["id"] for r in records}
        left = queue.get_queue_properties().approximate_message_count
        print()
        print(f"{args.rounds} evictions, events.poll_interval_s = {args.poll}, 2 workers, sample handler 10 x 20 ms chunks")
        for name, values in (("notice -> every worker stopped receiving", notice_to_stopped),
                             ("drain start -> every worker stopped receiving", drain_to_stopped),
                             ("last worker exit -> acknowledgement", exit_to_ack),
                             ("notice -> acknowledgement", notice_to_ack)):
            print(f"{name:48s} p50 {pct(values, 0.5) * 1000:8.1f} ms   p95 {pct(values, 0.95) * 1000:8.1f} ms   "
                  f"max {max(values) * 1000:8.1f} ms")
        resumed = sum(1 for r in records if int(r["resumed_from"]) > 0)  # type: ignore[call-overload]
        print(f"messages: {enqueued} enqueued, {len(unique)} completed, {len(records) - len(unique)} duplicates, "
              f"{resumed} resumed from a checkpoint, {left} left on the queue, lost = {enqueued - len(unique) - left}")
        print(f"(mean notice -> stopped {statistics.mean(notice_to_stopped) * 1000:.1f} ms)")
        return 0
    finally:
        sim.stop()
        stop(azurite)


if __name__ == "__main__":
    sys.exit(main())
