"""Throughput of one consumer thread against a bare SDK loop, on a local Azurite.

    .venv/bin/python bench/worker_throughput.py [--messages 2000] [--runs 2]

(a) bare: one QueueClient, Get Messages (32, visibility 60 s), delete each, until a page comes back empty;
(b) ours: WorkerRuntime, one consumer thread, batch 32, a no-op handler, until every message succeeded.

Every HTTP request azure-core sends is counted (tests/handlers.py:RequestLog wraps the
transport), so requests/message is what went on the wire. Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]

from azure.storage.queue import QueueClient  # noqa: E402
from handlers import RequestLog  # noqa: E402
from local_azurite import connection_string, free_port, start_azurite, stop  # noqa: E402

from worker.runtime import WorkerRuntime  # noqa: E402
from worker.settings import (  # noqa: E402
    EventsSettings,
    QueueSettings,
    Settings,
    TelemetrySettings,
    WorkloadSettings,
)
from worker.telemetry import setup_telemetry  # noqa: E402

BATCH = 32


def fill(conn: str, name: str, n: int) -> None:
    client = QueueClient.from_connection_string(conn, name)
    client.create_queue()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: client.send_message(f"message {i}"), range(n)))
    count = client.get_queue_properties().approximate_message_count
    if count != n:
        raise RuntimeError(f"enqueued {count} of {n}")


Result = tuple[float, int, int, float]  # wall seconds, messages done, requests, this process's CPU seconds


def bare(conn: str, name: str, n: int, log: RequestLog) -> Result:
    client = QueueClient.from_connection_string(conn, name)
    log.clear()
    cpu = time.process_time()
    began = time.perf_counter()
    done = 0
    while True:
        pages = client.receive_messages(max_messages=BATCH, messages_per_page=BATCH, visibility_timeout=60).by_page()
        page = list(next(pages, []))
        if not page:
            break
        for message in page:
            client.delete_message(message.id, message.pop_receipt)
            done += 1
    return time.perf_counter() - began, done, log.count(contains=f"/{name}"), time.process_time() - cpu


def ours(conn: str, name: str, n: int, log: RequestLog) -> Result:
    settings = Settings(
        queue=QueueSettings(connection_string=conn, name=name, batch_size=BATCH, visibility_timeout_s=60, idle_poll_max_s=0.5),
        workload=WorkloadSettings(handler="handlers:noop"),
        events=EventsSettings(source="none", endpoint="http://127.0.0.1:9"),
    )
    runtime = WorkerRuntime(settings, setup_telemetry(TelemetrySettings(), "worker"), threads=1)
    log.clear()
    cpu = time.process_time()
    began = time.perf_counter()
    runtime.start()
    while runtime.stats()["succeeded"] < n:
        time.sleep(0.002)
    elapsed = time.perf_counter() - began
    cpu = time.process_time() - cpu  # the 2 ms polling loop above included: a little over what the worker used
    requests = log.count(contains=f"/{name}")
    runtime.drain(time.time() + 5)
    runtime.close()
    return elapsed, runtime.stats()["succeeded"], requests, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    n = args.messages
    with tempfile.TemporaryDirectory() as workdir, open(Path(workdir) / "azurite.log", "wb") as azlog:
        port = free_port()
        proc = start_azurite(port, Path(workdir), azlog)
        try:
            conn = connection_string(port)
            results: dict[str, list[Result]] = {"bare": [], "ours": []}
            modes = [("bare", bare), ("ours", ours)]
            with RequestLog().installed() as log:
                for run in range(args.runs):
                    for label, measure in modes if run % 2 == 0 else modes[::-1]:  # alternate who goes first
                        name = f"bench{uuid.uuid4().hex[:12]}"
                        fill(conn, name, n)
                        elapsed, done, requests, cpu = measure(conn, name, n, log)
                        results[label].append((elapsed, done, requests, cpu))
                        print(f"run {run + 1} {label}: {done} msgs in {elapsed:6.2f}s = {done / elapsed:7.1f} msg/s, "
                              f"{requests} requests ({requests / max(1, done):.3f}/msg), "
                              f"client CPU {1000 * cpu / max(1, done):.2f} ms/msg", flush=True)
        finally:
            stop(proc)
    best = {label: min(runs, key=lambda r: r[0]) for label, runs in results.items()}
    rate = {label: r[1] / r[0] for label, r in best.items()}
    for label in ("bare", "ours"):
        elapsed, done, requests, cpu = best[label]
        print(f"best {label}: {rate[label]:.1f} msg/s ({requests / done:.3f} requests/msg, client CPU {1000 * cpu / done:.2f} ms/msg)")
    print(f"ours / bare: {rate['ours'] / rate['bare']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
