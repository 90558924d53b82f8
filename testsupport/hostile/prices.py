"""A stand-in for the Azure Retail Prices API that answers whatever a test tells it to, over real HTTP:
hostile JSON, endless answers, answers that trickle in, links to elsewhere, bodies of secrets."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    padding_bytes: int = 0  # this many spaces after the body (a huge answer never held in memory here)
    trickle_s: float = 0.0  # pause between chunks of 1 byte: each read is quick, the whole answer is not


class HostilePrices:
    """`answers` are served in order, the last one again and again; every request path is recorded."""

    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers) or [Answer()]
        self.requests: list[str] = []
        self.closing = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def endpoint(self) -> str:
        return f"{self.base}/api/retail/prices"

    def __enter__(self) -> HostilePrices:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()

    def _next(self) -> Answer:
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802
                stand_in.requests.append(self.path)
                answer = stand_in._next()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body) + answer.padding_bytes))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for chunk in _chunks(answer):
                        if stand_in.closing.is_set():
                            return
                        self.wfile.write(chunk)
                        if answer.trickle_s:
                            self.wfile.flush()
                            time.sleep(answer.trickle_s)
                except OSError:  # the client gave up: what the test wants to see
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _chunks(answer: Answer) -> Iterator[bytes]:
    if answer.trickle_s:
        for i in range(len(answer.body)):
            yield answer.body[i:i + 1]
        return
    yield answer.body
    left = answer.padding_bytes
    block = b" " * 65536
    while left > 0:
        yield block[:left]
        left -= len(block)
