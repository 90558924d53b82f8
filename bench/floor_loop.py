"""The protocol's own cost: a consumer with no SDK at all, for bench/cpu.py.

    python -m bench.floor_loop <workload> [--batch 32]   (BENCH_CONNECTION, BENCH_QUEUE, BENCH_DONE in the environment)

One keep-alive connection (http.client), Shared Key signing by hand, Get Messages
(--batch at a time, 60 s visibility), run each, Delete it; stop at the first
empty answer. No retries, no leases, no telemetry: what a message costs a client
that does nothing but speak the Queue service's REST protocol. Shared Key
connection strings only (Azurite's).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import http.client
import os
import re
import sys
from email.utils import formatdate
from html import unescape
from urllib.parse import quote, urlsplit

from bench.workloads import run

API_VERSION = "2021-02-12"
_MESSAGE = re.compile(rb"<MessageId>(.*?)</MessageId>.*?<PopReceipt>(.*?)</PopReceipt>.*?<MessageText>(.*?)</MessageText>", re.S)


class Floor:
    def __init__(self, connection_string: str, queue: str) -> None:
        parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
        self.account, self.key = parts["AccountName"], base64.b64decode(parts["AccountKey"])
        endpoint = urlsplit(parts["QueueEndpoint"])
        self.conn = http.client.HTTPConnection(endpoint.hostname or "", endpoint.port, timeout=30)
        self.path = f"{endpoint.path.rstrip('/')}/{queue}/messages"

    def call(self, method: str, path: str, query: dict[str, str]) -> tuple[int, bytes]:
        date = formatdate(usegmt=True)
        signed_query = "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
        to_sign = f"{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{API_VERSION}\n/{self.account}{path}{signed_query}"
        signature = base64.b64encode(hmac.new(self.key, to_sign.encode(), hashlib.sha256).digest()).decode()
        url = path + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())
        self.conn.request(method, url, headers={"x-ms-date": date, "x-ms-version": API_VERSION,
                                                "Authorization": f"SharedKey {self.account}:{signature}"})
        response = self.conn.getresponse()
        return response.status, response.read()

    def consume(self, workload: str, batch: int) -> None:
        while True:
            status, body = self.call("GET", self.path, {"numofmessages": str(batch), "visibilitytimeout": "60"})
            if status != 200:
                raise RuntimeError(f"Get Messages: HTTP {status}: {body[:200]!r}")
            messages = _MESSAGE.findall(body)
            if not messages:
                return
            for message_id, receipt, text in messages:
                run(workload, unescape(text.decode()))
                status, body = self.call("DELETE", f"{self.path}/{message_id.decode()}", {"popreceipt": unescape(receipt.decode())})
                if status != 204:
                    raise RuntimeError(f"Delete: HTTP {status}: {body[:200]!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("workload")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    Floor(os.environ["BENCH_CONNECTION"], os.environ["BENCH_QUEUE"]).consume(args.workload, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
