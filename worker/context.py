"""The handler's view of its run: checkpoint, drain flag, deadline."""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from typing import Any

from worker.lease import Lease
from worker.message import (
    MAX_MESSAGE_BYTES,
    CheckpointTooLarge,
    Codec,
    Envelope,
    text_size,
)


class StopSignal:
    """Set when this worker process is told to stop (a drain, a signal, the supervisor gone).

    The one holder of the process's deadline: handlers read it as `ctx.draining`
    and `ctx.deadline`, the worker's loop as `WorkerRuntime.deadline`. It only
    ever moves earlier.
    """

    def __init__(self) -> None:
        self._set = threading.Event()
        self.deadline: float | None = None  # time.time() epoch seconds

    def set(self, deadline: float) -> bool:
        """True when this moved the deadline (first stop, or an earlier deadline)."""
        moved = self.deadline is None or deadline < self.deadline
        if moved:
            self.deadline = deadline
        self._set.set()
        return moved

    @property
    def is_set(self) -> bool:
        return self._set.is_set()


class Context:
    def __init__(self, lease: Lease, codec: Codec, stop: StopSignal, logger: logging.Logger) -> None:
        self._lease = lease
        self._codec = codec
        self._stop = stop
        self.logger = logger

    @property
    def message_id(self) -> str:
        return self._lease.id

    @property
    def state(self) -> Any:
        """The last checkpoint of this message (from any earlier attempt), or None."""
        return self._lease.envelope.state

    @property
    def draining(self) -> bool:
        return self._stop.is_set

    @property
    def deadline(self) -> datetime | None:
        """When work must stop (None until a drain starts)."""
        d = self._stop.deadline
        return None if d is None else datetime.fromtimestamp(d, timezone.utc)

    def time_left(self) -> float | None:
        d = self._stop.deadline
        return None if d is None else max(0.0, d - time.time())

    def checkpoint(self, state: Any) -> bool:
        """Store `state` (JSON-serialisable) in the message; the next attempt sees it as ctx.state.

        Returns False if the lease was lost meanwhile (the checkpoint is then not stored).
        Raises CheckpointTooLarge, leaving the message unchanged, past the 64 KiB limit.
        """
        json.dumps(state)  # a TypeError here names the unserialisable value, before anything is sent
        current = self._lease.envelope
        updated = Envelope(current.original, state, current.releases)
        text = self._codec.seal(updated)
        size = text_size(text)
        if size > MAX_MESSAGE_BYTES:
            raise CheckpointTooLarge(
                f"checkpoint would make message {self._lease.id} {size} bytes, "
                f"over the queue's {MAX_MESSAGE_BYTES}-byte limit; nothing was stored"
            )
        return self._lease.checkpoint(updated, text)
