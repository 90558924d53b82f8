"""The floor: the plainest correct consumer one would write with the SDK alone.

    python bench/bare_loop.py <workload>   (BENCH_DONE, BENCH_QUEUE, BENCH_CONNECTION in the environment)

Get Messages (32 at a time, 60 s visibility), run each, delete it; stop at the
first empty page. No leases renewed, no retries, no drain: what the queue costs
and nothing more. The throughput benchmark starts N of these processes.
"""

from __future__ import annotations

import os
import sys

from azure.storage.queue import QueueClient
from workloads import run


def main() -> int:
    workload = sys.argv[1]
    client = QueueClient.from_connection_string(os.environ["BENCH_CONNECTION"], os.environ["BENCH_QUEUE"])
    while True:
        page = list(next(client.receive_messages(max_messages=32, messages_per_page=32, visibility_timeout=60).by_page(), []))
        if not page:
            return 0
        for message in page:
            run(workload, message.content)
            client.delete_message(message.id, message.pop_receipt)


if __name__ == "__main__":
    sys.exit(main())
