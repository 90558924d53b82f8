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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from azure.core.exceptions import HttpResponseError
from azure.storage.queue import QueueClient

from worker.message import MAX_MESSAGE_BYTES, Codec, Envelope, UndecodableMessage, text_size
from worker.queue.client import describe, ensure_queue, is_lease_lost, is_queue_missing
from worker.queue.lease_slots import LeaseSlots

log = logging.getLogger(__name__)


class LeaseState(enum.Enum):
    PENDING = "pending"  # received, handler not started
    RUNNING = "running"
    SETTLING = "settling"  # handler finished, its final call (delete, release, retry, poison) queued or under way
    DONE = "done"  # deleted, released, poisoned or lost: no more calls


class Lease:
    def __init__(self, client: QueueClient, codec: Codec, message_id: str, pop_receipt: str,
                 envelope: Envelope, visibility_timeout_s: int, slots: LeaseSlots | None = None) -> None:
        self.client = client
        self.codec = codec
        self.id = message_id
        self.pop_receipt = pop_receipt
        self.envelope = envelope
        self.visibility_timeout_s = visibility_timeout_s
        self.renewed_at = time.monotonic()
        self.state = LeaseState.PENDING
        self.released = False  # given back by release(): counted as released where that was called
        self.lock = threading.Lock()
        # Shared with the supervisor's lease guard (see worker.queue.lease_slots); None in a standalone worker.
        self.slots = slots
        self.slot = slots.claim(message_id, pop_receipt, visibility_timeout_s, self._release_text()) if slots else None

    def _release_text(self) -> str | None:
        """The queue text that records one more release, if it fits (None for text that is not ours to
        re-encode: an undecodable message on its way to poison)."""
        try:
            text = self.codec.seal(replace(self.envelope, releases=self.envelope.releases + 1), self.id)
        except UndecodableMessage:
            return None
        return text if text_size(text) <= MAX_MESSAGE_BYTES else None

    @contextmanager
    def _shared_slot(self) -> Iterator[None]:
        """Caller holds self.lock. Around one queue call: the slot's lock, the receipt the supervisor may
        have renewed, and afterwards the new receipt (or the slot freed once the lease is done)."""
        slots, slot = self.slots, self.slot
        if slots is None or slot is None:
            yield
            return
        with slots.locked(slot):
            self.pop_receipt = slots.pop_receipt(slot)
            self.renewed_at = max(self.renewed_at, slots.renewed_at(slot))
            try:
                yield
            finally:
                if self.state is LeaseState.DONE:
                    slots.free(slot)
                    self.slot = None
                else:
                    slots.record(slot, self.pop_receipt, self.renewed_at)

    def last_renewed(self) -> float:
        """When the lease was last extended, by this process or by the supervisor's guard (read without the
        slot's lock: a hint). Renewing one the guard just renewed would be worse than useless: a renewal
        under way holds the slot's lock, and if a handler then takes the GIL, the guard cannot renew it."""
        slots, slot = self.slots, self.slot
        if slots is None or slot is None:
            return self.renewed_at
        return max(self.renewed_at, slots.renewed_at(slot))

    def start(self) -> bool:
        """PENDING → RUNNING; False when a drain released it first, or its lease ran out while it waited
        (the queue may have handed it to another consumer: running it here too would run it twice)."""
        with self.lock:
            if self.state is not LeaseState.PENDING:
                return False
            with self._shared_slot():  # the guard may have renewed it meanwhile
                if time.monotonic() - self.renewed_at >= self.visibility_timeout_s:
                    log.warning("the lease of message %s ran out before its handler started; left to the queue", self.id)
                    self.state = LeaseState.DONE
                    return False
                self.state = LeaseState.RUNNING
                return True

    def supersede(self) -> bool:
        """The queue handed this message out again, so this receipt is void. A lease whose handler has not
        started ends here (True: that delivery never ran). A running or settling one goes on: its next
        queue call finds the lease lost. Never waits behind a final call under way."""
        if self.state is not LeaseState.PENDING:  # states only move forward: no lock needed to rule PENDING out
            return False
        with self.lock:
            if self.state is not LeaseState.PENDING:
                return False
            with self._shared_slot():
                self.state = LeaseState.DONE
            return True

    def begin_settling(self) -> bool:
        """PENDING/RUNNING → SETTLING, so a drain or deadline no longer gives it back; False when already DONE."""
        with self.lock:
            if self.state is LeaseState.DONE:
                return False
            self.state = LeaseState.SETTLING
            return True

    def _update(self, content: str | None, visibility_timeout_s: int, **request: Any) -> None:
        """Caller holds the lock. Keeps the newest pop receipt."""
        receipt = self.client.update_message(self.id, self.pop_receipt, content=content, visibility_timeout=visibility_timeout_s,
                                             **request)
        self.pop_receipt = receipt.pop_receipt or self.pop_receipt
        self.renewed_at = time.monotonic()

    def _guarded(self, what: str, action: Callable[[], Any], finish: bool, only_if: tuple[LeaseState, ...] | None = None,
                 wait: bool = True) -> bool:
        """Run one queue call under the lock; a lost lease is logged and ends the lease. With wait=False,
        nothing is done (False) while another call holds the lock."""
        if not self.lock.acquire(blocking=wait):
            return False
        try:
            if self.state is LeaseState.DONE or (only_if is not None and self.state not in only_if):
                return False
            with self._shared_slot():
                try:
                    action()
                except Exception as exc:
                    if is_lease_lost(exc):
                        log.warning("lease lost on %s of message %s (%s): another consumer may have it", what, self.id, describe(exc))
                        self.state = LeaseState.DONE
                        return False
                    if finish:  # a final call that failed is not retried: the message reappears after its lease
                        self.state = LeaseState.DONE
                    raise
                if finish:
                    self.state = LeaseState.DONE
                return True
        finally:
            self.lock.release()

    def renew(self, timeout_s: float | None = None) -> bool:
        """Extend the lease; with `timeout_s`, one request bounded by it (no SDK retries: the keeper's next tick is one).
        Skipped (False) while another call holds the lease: a checkpoint renews it anyway, and a final call may
        hang until its request times out (a lost response), which must not hold up renewals."""
        request: dict[str, Any] = {}
        if timeout_s is not None:
            request = {"connection_timeout": timeout_s, "read_timeout": timeout_s, "retry_total": 0}
        return self._guarded("renewal", lambda: self._update(None, self.visibility_timeout_s, **request), finish=False,
                             wait=False)

    def checkpoint(self, envelope: Envelope, text: str) -> bool:
        """Store `envelope` (already sealed as `text`) and renew the lease in the same call."""
        def store() -> None:
            self._update(text, self.visibility_timeout_s)
            self.envelope = envelope
            if self.slots is not None and self.slot is not None:
                self.slots.set_release_text(self.slot, self._release_text())

        return self._guarded("checkpoint", store, finish=False)

    def delete(self) -> bool:
        return self._guarded("delete", lambda: self.client.delete_message(self.id, self.pop_receipt), finish=True)

    def move_to(self, poison: QueueClient, text: str | None = None) -> bool:
        """Copy `text` (default: the original text) to the poison queue, then delete: never the other way round.
        Under the lock, so a message released meanwhile (deadline) is not copied while it is back on the queue."""
        def move() -> None:
            content = self.envelope.original if text is None else text
            try:
                poison.send_message(content, time_to_live=-1)  # never expires
            except HttpResponseError as exc:
                if not is_queue_missing(exc):
                    raise
                log.warning("poison queue %s is missing (deleted?); creating it again", poison.queue_name)
                ensure_queue(poison)
                poison.send_message(content, time_to_live=-1)
            self.client.delete_message(self.id, self.pop_receipt)

        return self._guarded("move to poison", move, finish=True)

    def retry_later(self, delay_s: int) -> bool:
        """Visible again after `delay_s`, with this failed attempt recorded in the message (the same update)."""
        counted = replace(self.envelope, failures=self.envelope.failures + 1, upgraded=False)
        content: str | None = self.codec.seal(counted, self.id)
        if content is not None and text_size(content) > MAX_MESSAGE_BYTES:
            # No room for the header: the failure goes unrecorded (it still counts, late: see judged_failures).
            content = None
        return self._guarded("retry", lambda: self._update(content, delay_s), finish=True)

    def release(self, only_if: tuple[LeaseState, ...] | None = None, delay_s: int = 0) -> bool:
        """Visible again after `delay_s` (at once by default), counting the release in the message so it
        never counts as a failure. With `only_if`, only from those states (a drain gives back PENDING ones,
        a deadline never SETTLING ones)."""
        def give_back() -> None:
            counted = replace(self.envelope, releases=self.envelope.releases + 1)
            text = self.codec.seal(counted, self.id)
            if text_size(text) <= MAX_MESSAGE_BYTES:
                self._update(text, delay_s)
                return
            # No room for even the small header: a fresh copy replaces it (its dequeue count starts again, so
            # this attempt is not counted as a failure; earlier ones are forgotten with it). Copy, then delete.
            log.warning("message %s is too large to record its release (%d bytes with the header); re-enqueued as a "
                        "fresh copy", self.id, text_size(text))
            self.client.send_message(self.envelope.original, visibility_timeout=delay_s or None)
            self.client.delete_message(self.id, self.pop_receipt)

        self.released = self._guarded("release", give_back, finish=True, only_if=only_if)
        return self.released

    def finish_without_call(self) -> None:
        with self.lock, self._shared_slot():
            self.state = LeaseState.DONE


class LeaseTable:
    """Every message this process holds, for renewal and for release on drain."""

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._lock = threading.Lock()

    def add(self, lease: Lease) -> None:
        """Hold `lease`. A lease this process still held for the same message (its receipt was voided when the
        queue handed the message out again) must have been superseded first: see `earlier`."""
        with self._lock:
            self._leases[lease.id] = lease

    def earlier(self, message_id: str) -> Lease | None:
        """The lease this process holds for `message_id`, if any."""
        with self._lock:
            return self._leases.get(message_id)

    def remove(self, lease: Lease) -> None:
        """Forget `lease` (not a later delivery of the same message that replaced it)."""
        with self._lock:
            if self._leases.get(lease.id) is lease:
                del self._leases[lease.id]

    def release(self, running_too: bool) -> int:
        """Give back every message not started yet (visibility 0), and with `running_too` those of running
        handlers as well, keeping their checkpoints (never finished ones whose final call is queued or under
        way: those are settled as decided); returns how many. Released or lost leases leave the table."""
        released = 0
        states = (LeaseState.PENDING, LeaseState.RUNNING) if running_too else (LeaseState.PENDING,)
        for lease in self.snapshot():
            if lease.state not in states:
                # States only move forward, so this unlocked look is safe; it keeps a drain from waiting
                # behind a delete or checkpoint under way on another message's lock.
                continue
            try:
                if lease.release(only_if=states):
                    released += 1
            except Exception as exc:  # one failing call must not keep the others from being released
                log.warning("could not release message %s (%s); it reappears after its lease", lease.id, describe(exc))
                lease.finish_without_call()
            if lease.state is LeaseState.DONE:  # released, lost, or given up: nothing more to do with it
                self.remove(lease)
        return released

    def snapshot(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._leases)


def renewal_timeout_s(visibility_timeout_s: int, request_timeout_s: float) -> float:
    """The time limit of one renewal request: well under the margin left at renewal time (half the
    visibility timeout, or less for the supervisor's guard), so several tries fit in it."""
    return max(0.5, min(request_timeout_s, visibility_timeout_s / 6))


class LeaseKeeper(threading.Thread):
    """Renews every held message well before its visibility timeout runs out.

    Renewals run concurrently (at most `MAX_CONCURRENT_RENEWALS`), each one request bounded by
    `renew_timeout_s`, so one stalled call cannot make the others' leases expire.
    """

    MAX_CONCURRENT_RENEWALS = 8

    def __init__(self, table: LeaseTable, visibility_timeout_s: int, stop: threading.Event,
                 request_timeout_s: float = 30.0) -> None:
        super().__init__(name="lease-keeper", daemon=True)
        self.table = table
        self.renew_after_s = visibility_timeout_s / 2
        self.renew_timeout_s = renewal_timeout_s(visibility_timeout_s, request_timeout_s)
        self.tick_s = max(0.05, min(1.0, visibility_timeout_s / 6))
        self.stop_event = stop
        self._renewing: set[str] = set()
        self._renewing_lock = threading.Lock()

    def run(self) -> None:
        with ThreadPoolExecutor(self.MAX_CONCURRENT_RENEWALS, thread_name_prefix="lease-renewal") as pool:
            woke = time.monotonic()
            while not self.stop_event.wait(self.tick_s):
                now = time.monotonic()
                stalled = now - woke - self.tick_s
                woke = now
                if stalled >= self.renew_after_s and len(self.table):
                    # Only a handler holding the GIL (or a stopped process) keeps this thread from waking.
                    log.warning("the lease keeper could not run for %.1fs (a handler holding the GIL?); under the "
                                "supervisor, its lease guard renews meanwhile, otherwise leases may have been lost",
                                stalled)
                for lease in self.table.snapshot():
                    if lease.state is LeaseState.DONE or now - lease.last_renewed() < self.renew_after_s:
                        continue
                    with self._renewing_lock:
                        if lease.id in self._renewing:
                            continue
                        self._renewing.add(lease.id)
                    pool.submit(self._renew, lease)

    def _renew(self, lease: Lease) -> None:
        try:
            lease.renew(self.renew_timeout_s)
        except Exception as exc:  # the next tick tries again; the lease still has most of its time
            log.warning("lease renewal of message %s failed: %s", lease.id, describe(exc))
        finally:
            with self._renewing_lock:
                self._renewing.discard(lease.id)
