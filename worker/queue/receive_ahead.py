"""The next batch, received on a thread of its own while the consumer's current batch runs."""

from __future__ import annotations

import threading
from collections.abc import Callable

from worker.message import Message
from worker.queue.lease import Lease

Batch = list[tuple[Lease, Message, int]]  # each message with its lease and its earlier failures


class ReceiveAhead:
    """One receive on a thread of its own, picked up by the consumer when its batch is done."""

    def __init__(self, receive: Callable[[], Batch | None], name: str) -> None:
        self.finished = threading.Event()
        self._batch: Batch | None = None
        self._error: Exception | None = None
        self._receive = receive
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._batch = self._receive()
        except Exception as exc:
            self._error = exc
        finally:
            self.finished.set()

    def result(self) -> Batch | None:
        self.finished.wait()
        if self._error is not None:
            raise self._error
        return self._batch
