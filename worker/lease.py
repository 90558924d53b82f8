"""Held messages: one lock per message serialises every call that needs its pop receipt.

Every update_message returns a new pop receipt and invalidates the old one, so
renewal (keeper thread), checkpoint (handler thread) and delete/release (any
thread) must never race on the same message.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from azure.storage.queue import QueueClient

from worker.message import MAX_MESSAGE_BYTES, Codec, Envelope, text_size
from worker.queue_client import describe, is_lease_lost

log = logging.getLogger(__name__)


class LeaseState(enum.Enum):
    PENDING = "pending"  # received, handler not started
    RUNNING = "running"
    DONE = "done"  # deleted, released, poisoned or lost: no more calls


class Lease:
    def __init__(self, client: QueueClient, codec: Codec, message_id: str, pop_receipt: str,
                 envelope: Envelope, visibility_timeout_s: int) -> None:
        self.client = client
        self.codec = codec
        self.id = message_id
        self.pop_receipt = pop_receipt
        self.envelope = envelope
        self.visibility_timeout_s = visibility_timeout_s
        self.renewed_at = time.monotonic()
        self.state = LeaseState.PENDING
        self.lock = threading.Lock()

    def start(self) -> bool:
        """PENDING → RUNNING; False when a drain released it first."""
        with self.lock:
            if self.state is not LeaseState.PENDING:
                return False
            self.state = LeaseState.RUNNING
            return True

    def _update(self, content: str | None, visibility_timeout_s: int) -> None:
        """Caller holds the lock. Keeps the newest pop receipt."""
        receipt = self.client.update_message(self.id, self.pop_receipt, content=content, visibility_timeout=visibility_timeout_s)
        self.pop_receipt = receipt.pop_receipt or self.pop_receipt
        self.renewed_at = time.monotonic()

    def _guarded(self, what: str, action: Callable[[], Any], finish: bool, only_if: LeaseState | None = None) -> bool:
        """Run one queue call under the lock; a lost lease is logged and ends the lease."""
        with self.lock:
            if self.state is LeaseState.DONE or (only_if is not None and self.state is not only_if):
                return False
            try:
                action()
            except Exception as exc:
                if is_lease_lost(exc):
                    log.warning("lease lost on %s of message %s (%s): another consumer may have it", what, self.id, describe(exc))
                    self.state = LeaseState.DONE
                    return False
                raise
            if finish:
                self.state = LeaseState.DONE
            return True

    def renew(self) -> bool:
        return self._guarded("renewal", lambda: self._update(None, self.visibility_timeout_s), finish=False)

    def checkpoint(self, envelope: Envelope, text: str) -> bool:
        """Store `envelope` (already sealed as `text`) and renew the lease in the same call."""
        def store() -> None:
            self._update(text, self.visibility_timeout_s)
            self.envelope = envelope

        return self._guarded("checkpoint", store, finish=False)

    def delete(self) -> bool:
        return self._guarded("delete", lambda: self.client.delete_message(self.id, self.pop_receipt), finish=True)

    def move_to(self, poison: QueueClient, text: str | None = None) -> bool:
        """Copy `text` (default: the original text) to the poison queue, then delete: never the other way round.
        Under the lock, so a message released meanwhile (deadline) is not copied while it is back on the queue."""
        def move() -> None:
            poison.send_message(self.envelope.original if text is None else text, time_to_live=-1)  # never expires
            self.client.delete_message(self.id, self.pop_receipt)

        return self._guarded("move to poison", move, finish=True)

    def retry_later(self, delay_s: int) -> bool:
        return self._guarded("retry", lambda: self._update(None, delay_s), finish=True)

    def release(self, only_if_pending: bool = False) -> bool:
        """Visible again at once, counting the release in the message so it never counts as a failure."""
        def give_back() -> None:
            counted = Envelope(self.envelope.original, self.envelope.state, self.envelope.releases + 1)
            text: str | None = self.codec.seal(counted)
            if text is not None and text_size(text) > MAX_MESSAGE_BYTES:
                log.warning("message %s is too large to record its release; released without counting it", self.id)
                text = None
            self._update(text, 0)

        return self._guarded("release", give_back, finish=True, only_if=LeaseState.PENDING if only_if_pending else None)

    def finish_without_call(self) -> None:
        with self.lock:
            self.state = LeaseState.DONE


class LeaseTable:
    """Every message this process holds, for renewal and for release on drain."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.id] = lease

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.id, None)

    def snapshot(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)


class LeaseKeeper(threading.Thread):
    """Renews every held message well before its visibility timeout runs out."""

    def __init__(self, table: LeaseTable, visibility_timeout_s: int, stop: threading.Event) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.table = table
        self.renew_after_s = visibility_timeout_s / 2
        self.tick_s = max(0.05, min(1.0, visibility_timeout_s / 6))
        self.stop_event = stop

    def run(self) -> None:
        while not self.stop_event.wait(self.tick_s):
            now = time.monotonic()
            for lease in self.table.snapshot():
                if lease.state is not LeaseState.DONE and now - lease.renewed_at >= self.renew_after_s:
                    try:
                        lease.renew()
                    except Exception as exc:  # the next tick tries again; the lease still has half its time
                        log.warning("lease renewal of message %s failed: %s", lease.id, describe(exc))
