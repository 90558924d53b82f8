"""How Azurite's request latency grows with queue depth (an emulator trait; Azure's does not).

    .venv/bin/python -m bench.azurite_depth [--depths 10,200,600,1000,2000,4000]

For each depth: a fresh queue with that many messages, then the mean time of
Get Messages (1 and 32 at a time) and of Delete Message. Explains the queue
depths the throughput benchmark keeps to. Writes bench/results/azurite_depth.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import azurite, fill, new_queue, save

SAMPLES = 10


def mean_ms(call: Any) -> float:
    started = time.perf_counter()
    for _ in range(SAMPLES):
        call()
    return (time.perf_counter() - started) / SAMPLES * 1000


def probe(conn: str, depth: int) -> dict[str, float]:
    client = new_queue(conn, f"depth{depth}")
    fill(client, [f"m{i}" for i in range(depth)])

    def receive(n: int, lease_s: int) -> list[Any]:
        return list(next(client.receive_messages(max_messages=n, messages_per_page=n, visibility_timeout=lease_s).by_page(), []))

    held = receive(SAMPLES, 60)
    deleting = iter(held)
    delete_ms = mean_ms(lambda: (lambda m: client.delete_message(m.id, m.pop_receipt))(next(deleting)))
    fill(client, [f"r{i}" for i in range(len(held))])  # back to `depth`
    # 1 s leases: the probe does not drain a shallow queue dry while it measures
    row = {"depth": depth, "get_1_ms": mean_ms(lambda: receive(1, 1)), "get_32_ms": mean_ms(lambda: receive(32, 1)), "delete_ms": delete_ms}
    client.delete_queue()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="10,200,600,1000,2000,4000")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="spot-bench-") as tmp, azurite(Path(tmp)) as conn:
        print(f"{'depth':>6} {'get 1 ms':>9} {'get 32 ms':>10} {'delete ms':>10}")
        for depth in (int(d) for d in args.depths.split(",")):
            row = probe(conn, depth)
            rows.append(row)
            print(f"{depth:>6} {row['get_1_ms']:9.1f} {row['get_32_ms']:10.1f} {row['delete_ms']:10.1f}", flush=True)
    save("azurite_depth", {"samples": SAMPLES, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
