"""Count what the queue clients put on the wire, in this process: azure-core's and the lean path's."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class RequestLog:
    """Every HTTP request the queue clients send in this process (retries included), with its time.

    Wraps RequestsTransport.send, the transport every SDK QueueClient here uses, and QueueHttp._send, the
    lean per-message path's (worker.queue.transport), so what is counted is what went on the wire.
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

        from worker.queue.transport import QueueHttp

        original = RequestsTransport.send
        original_lean = QueueHttp._send
        log = self

        def send(transport: RequestsTransport, request: Any, **kwargs: Any) -> Any:
            with log._lock:
                log.requests.append((time.monotonic(), request.method, request.url))
            return original(transport, request, **kwargs)

        def send_lean(http: QueueHttp, method: str, path: str, target: str, *args: Any, **kwargs: Any) -> Any:
            url = target if target.startswith("http") else f"{'https' if http.https else 'http'}://{http.netloc}{target}"
            with log._lock:
                log.requests.append((time.monotonic(), method, url))
            return original_lean(http, method, path, target, *args, **kwargs)

        RequestsTransport.send = send
        QueueHttp._send = send_lean  # type: ignore[method-assign,assignment]
        try:
            yield self
        finally:
            RequestsTransport.send = original
            QueueHttp._send = original_lean  # type: ignore[method-assign]
