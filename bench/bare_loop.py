"""The floor: the plainest correct consumer one would write with the SDK alone.

    python -m bench.bare_loop <workload> [--processes N] [--batch 32]   (BENCH_CONNECTION, BENCH_QUEUE, BENCH_DONE in the environment)

Each process: Get Messages (--batch at a time, 60 s visibility), run each, delete
it; stop at the first empty page. No leases renewed, no retries, no drain: what
the queue costs and nothing more. With --processes N the parent starts N such
processes and waits for them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from azure.storage.queue import QueueClient

from bench.workloads import run


def consume(workload: str, batch: int) -> None:
    client = QueueClient.from_connection_string(os.environ["BENCH_CONNECTION"], os.environ["BENCH_QUEUE"])
    while True:
        page = list(next(client.receive_messages(max_messages=batch, messages_per_page=batch, visibility_timeout=60).by_page(), []))
        if not page:
            return
        for message in page:
            run(workload, message.content)
            client.delete_message(message.id, message.pop_receipt)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.processes == 1:
        consume(args.workload, args.batch)
        return 0
    argv = [sys.executable, "-m", "bench.bare_loop", args.workload, "--batch", str(args.batch)]
    children = [subprocess.Popen(argv) for _ in range(args.processes)]
    return max(child.wait() for child in children)


if __name__ == "__main__":
    sys.exit(main())
