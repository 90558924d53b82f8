"""The handler's view of its run: checkpoint, drain flag, deadline."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from worker.common.backoff import Backoff
from worker.message import (
    MAX_MESSAGE_BYTES,
    MAX_STATE_DEPTH,
    CheckpointTooLarge,
    Codec,
    json_depth,
    text_size,
)
from worker.queue.client import describe
from worker.queue.lease import Lease

log = logging.getLogger(__name__)

CHECKPOINT_TRIES = 3  # each one already the SDK's own retries
CHECKPOINT_RETRY_BASE_S = 0.5


class StopSignal:
    """Set when this worker process is told to stop (a drain, a signal, the supervisor gone): from then on
    it receives nothing more.

    The one holder of the process's deadline: handlers read it as `ctx.draining`
    and `ctx.deadline`, the worker's loop as `WorkerRuntime.deadline`. It only
    ever moves earlier. It also counts the receives under way: a receive is
    counted only while the signal is not set, checked under the same lock that
    set() takes, so a drain that sees no receive under way sees the last one
    that will ever be (see WorkerRuntime.idle).
    """

    def __init__(self) -> None:
        self._set = threading.Event()
        self._lock = threading.Lock()
        self._receiving = 0
        self.deadline: float | None = None  # time.time() epoch seconds
        self.set_at: float | None = None  # time.time() of the first set()

    def set(self, deadline: float) -> bool:
        """Stop, with `deadline` (or the earlier one already set); True the first time."""
        with self._lock:
            first = not self._set.is_set()
            if self.deadline is None or deadline < self.deadline:
                self.deadline = deadline
            if first:
                self.set_at = time.time()
            self._set.set()
        return first

    def is_set(self) -> bool:
        return self._set.is_set()

    def wait(self, timeout: float) -> bool:
        """Until set or `timeout` seconds passed; True when set."""
        return self._set.wait(timeout)

    def begin_receive(self) -> bool:
        """Count one receive under way; False (nothing counted) once set."""
        with self._lock:
            if self._set.is_set():
                return False
            self._receiving += 1
            return True

    def end_receive(self) -> None:
        with self._lock:
            self._receiving -= 1

    @property
    def receiving(self) -> int:
        """Receives under way."""
        with self._lock:
            return self._receiving


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
        return self._stop.is_set()

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

        Returns False when it was not stored: the lease was lost meanwhile, or the queue stayed
        unavailable through a few tries (the handler goes on; a later checkpoint may succeed).
        Raises CheckpointTooLarge, leaving the message unchanged, past the 64 KiB limit or
        nested deeper than MAX_STATE_DEPTH levels.
        """
        depth = json_depth(state)
        if depth > MAX_STATE_DEPTH:
            raise CheckpointTooLarge(f"checkpoint of message {self._lease.id} nests {depth} levels deep, over the "
                                     f"{MAX_STATE_DEPTH}-level limit; nothing was stored")
        json.dumps(state)  # a TypeError here names the unserialisable value, before anything is sent
        updated = replace(self._lease.envelope, state=state, upgraded=False)
        text = self._codec.seal(updated, self._lease.id)
        size = text_size(text)
        if size > MAX_MESSAGE_BYTES:
            raise CheckpointTooLarge(
                f"checkpoint would make message {self._lease.id} {size} bytes, "
                f"over the queue's {MAX_MESSAGE_BYTES}-byte limit; nothing was stored"
            )
        backoff = Backoff(CHECKPOINT_RETRY_BASE_S, CHECKPOINT_RETRY_BASE_S * 4)
        for attempt in range(1, CHECKPOINT_TRIES + 1):
            try:
                return self._lease.checkpoint(updated, text)
            except Exception as exc:  # the queue is failing: not the handler's fault, so never raised into it
                if attempt == CHECKPOINT_TRIES:
                    log.warning("checkpoint of message %s not stored after %d tries (%s); the handler goes on",
                                self._lease.id, attempt, describe(exc))
                    return False
                time.sleep(backoff.next_delay())
        return False
