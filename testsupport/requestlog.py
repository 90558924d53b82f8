"""Count what azure-core puts on the wire, in this process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RequestLog:
    """Every HTTP request azure-core sends in this process (retries included), with its time.

    Wraps RequestsTransport.send, the transport every QueueClient here uses, so
    what is counted is what went on the wire.
    """

    def __init__(self) -> None:
        self.requests: list[tuple[float, str, str]] = []  # (monotonic time, method, url)
        self._lock = threading.Lock()

    def count(self, method: str | None = None, contains: str = "") -> int:
        return len(self.matching(method, contains))

    def matching(self, method: str | None = None, contains: str = "") -> list[tuple[float, str, str]]:
        with self._lock:
            return [r for r in self.requests if (method is None or r[1] == method) and contains in r[2]]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    @contextmanager
    def installed(self) -> Iterator[RequestLog]:
        from azure.core.pipeline.transport import RequestsTransport

        original = RequestsTransport.send
        log = self

        def send(transport: RequestsTransport, request: Any, **kwargs: Any) -> Any:
            with log._lock:
                log.requests.append((time.monotonic(), request.method, request.url))
            return original(transport, request, **kwargs)

        RequestsTransport.send = send
        try:
            yield self
        finally:
            RequestsTransport.send = original
