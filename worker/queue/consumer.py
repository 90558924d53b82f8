"""One consumer loop: receive a batch, run the handler per message, settle each message.

A message leaves the queue only by delete after its handler returned, or by a
move to the poison queue. Everything else (failure, interruption, drain,
crash) leaves it on the queue to be received again.

Queue round trips stay off the handler's path: a finished message is settled
on the process's Settler while the next handler runs, and the next Get
Messages is issued while the current batch's last messages run (within the
prefetch_s budget), so a worker does not wait for a round trip per message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from azure.storage.queue import QueueClient, QueueMessage

from worker.common.backoff import Backoff, interruption_delay_s, retry_delay_s
from worker.context import Context, StopSignal
from worker.message import Codec, Envelope, Interrupted, Message, UndecodableMessage
from worker.programs.runner import ProgramFailed
from worker.queue.client import describe, ensure_queue, is_auth_error, message_client
from worker.queue.lease import Lease, LeaseTable
from worker.queue.lease_slots import LeaseSlots
from worker.queue.poisoned import poisoned_text
from worker.queue.receive_ahead import Batch, ReceiveAhead
from worker.queue.settle import Settler
from worker.settings import QueueSettings
from worker.telemetry.providers import MESSAGE_OUTCOMES, Telemetry, mark_failed

log = logging.getLogger(__name__)
handler_log = logging.getLogger("worker.handler")


@dataclass
class Counters:
    by_outcome: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MESSAGE_OUTCOMES, 0))
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: str, n: int = 1) -> None:
        with self.lock:
            self.by_outcome[outcome] += n

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return {**self.by_outcome, "running": self.running}


@dataclass
class Shared:
    """What every consumer thread of one worker process shares."""

    settings: QueueSettings
    handler: Callable[[Message, Context], Any]
    telemetry: Telemetry
    codec: Codec
    leases: LeaseTable = field(default_factory=LeaseTable)
    stop: StopSignal = field(default_factory=StopSignal)  # also the handlers' view: ctx.draining, ctx.deadline
    counters: Counters = field(default_factory=Counters)
    lease_slots: LeaseSlots | None = None  # shared with the supervisor's lease guard
    settler: Settler = field(init=False)
    _poison: QueueClient | None = None
    _poison_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.settler = Settler(self.settings.max_outstanding_settles)

    def poison_client(self) -> QueueClient:
        with self._poison_lock:
            if self._poison is None:
                client = message_client(self.settings, self.settings.poison_name)
                ensure_queue(client)
                self._poison = client
            return self._poison


class Consumer:
    def __init__(self, shared: Shared, index: int = 0) -> None:
        self.shared = shared
        self.index = index
        self.settings = shared.settings
        self.client = message_client(self.settings)
        self.empty_polls = Backoff(0.1, self.settings.idle_poll_max_s)  # while the queue has nothing
        self.errors = Backoff(1.0, 60.0)
        self.handler_s: float | None = None  # moving average of handler durations
        self.receive_s = 0.0  # moving average of a Get Messages round trip
        self.ahead: ReceiveAhead | None = None  # the next batch, received while this one runs
        self.last_error = ""  # of this consumer's last failed handler call

    def receive_count(self) -> int:
        """How many messages to take: about prefetch_s of work, so slow handlers on one VM
        do not sit on messages that idle VMs could run. One until a duration is known."""
        n = self.settings.batch_size
        if self.settings.prefetch_s <= 0:
            return n
        if self.handler_s is None:
            return 1
        return max(1, min(n, int(self.settings.prefetch_s / max(self.handler_s, 1e-6))))

    def ahead_count(self, remaining: int) -> int:
        """How many messages to receive ahead as the first of `remaining` messages of this batch starts:
        0 until their work is about a round trip away (the last message at the latest), and never more
        than fits in prefetch_s with them. 0 while the handler's duration is unknown."""
        h = self.handler_s
        if h is None or (remaining > 1 and remaining * h > 2 * self.receive_s):
            return 0
        if self.settings.prefetch_s <= 0:
            return self.settings.batch_size
        return max(0, min(self.settings.batch_size, int(self.settings.prefetch_s / max(h, 1e-6)) - remaining))

    def observe_duration(self, seconds: float) -> None:
        self.handler_s = seconds if self.handler_s is None else 0.8 * self.handler_s + 0.2 * seconds

    def run(self) -> None:
        stop = self.shared.stop
        if self.index == 0:
            self.create_queue()
        try:
            while not stop.is_set():
                try:
                    batch = self.next_batch()
                except Exception as exc:
                    delay = self.errors.next_delay()
                    if is_auth_error(exc):
                        log.warning("queue %s refused access (%s): the identity needs the Storage Queue Data Contributor role, "
                                    "or its assignment has not propagated yet; retrying in %.1fs", self.settings.name, describe(exc), delay)
                    else:
                        log.warning("receiving from queue %s failed (%s); retrying in %.1fs", self.settings.name, describe(exc), delay)
                    stop.wait(delay)
                    continue
                self.errors.reset()
                if batch is None:
                    stop.wait(self.empty_polls.next_delay())
                    continue
                self.empty_polls.reset()
                self.run_batch(batch)
        finally:
            if self.ahead is not None:  # stay alive (and counted as receiving) until it is back: see WorkerRuntime.idle
                self.ahead.finished.wait()

    def next_batch(self) -> Batch | None:
        ahead, self.ahead = self.ahead, None
        return ahead.result() if ahead is not None else self.receive_batch(self.receive_count())

    def receive_batch(self, n: int) -> Batch | None:
        """Receive up to n and register leases (counted as `receiving` throughout, so a drain
        never takes a just-received message for nothing held). None when the queue was empty."""
        stop = self.shared.stop
        if not stop.begin_receive():
            return None
        try:
            if (slots := self.shared.lease_slots) is not None and (free := slots.free_count()) < n:
                if free == 0:
                    log.warning("every slot of the shared lease table is taken; not receiving until one is free")
                    return None
                n = free
            received = self.receive(n)
            if not received:
                return None
            opened = [opened for opened in map(self.open, received) if opened is not None]
            if stop.is_set():  # began while this receive was under way (ahead, maybe): give them back now
                release_pending(self.shared)
                return None
            return opened
        finally:
            stop.end_receive()

    def create_queue(self) -> None:
        try:
            ensure_queue(self.client)
        except Exception as exc:  # receive retries with backoff and says why; creating it is a convenience
            log.warning("could not create queue %s (%s); using it as it is", self.settings.name, describe(exc))

    def receive(self, n: int) -> list[QueueMessage]:
        started = time.perf_counter()
        pages = self.client.receive_messages(
            messages_per_page=n, max_messages=n, visibility_timeout=self.settings.visibility_timeout_s
        ).by_page()
        page = next(pages, None)  # exactly one Get Messages call
        received = list(page) if page is not None else []
        elapsed = time.perf_counter() - started
        self.receive_s = elapsed if not self.receive_s else 0.8 * self.receive_s + 0.2 * elapsed
        return received

    def run_batch(self, batch: Batch) -> None:
        for position, (lease, message, prior_failures) in enumerate(batch):
            if self.shared.stop.is_set():
                # Checked before every message, not once per batch: the drain releases pending leases one
                # request at a time, and the next message of this batch must not start meanwhile.
                release_pending(self.shared)
                return
            self.receive_ahead(len(batch) - position)
            if lease.start():
                self.run_handler(lease, message, prior_failures)
            else:  # released by a drain, or its lease was lost while it waited
                self.shared.leases.remove(lease)

    def receive_ahead(self, remaining: int) -> None:
        if self.ahead is None and not self.shared.stop.is_set() and (n := self.ahead_count(remaining)) > 0:
            self.ahead = ReceiveAhead(lambda: self.receive_batch(n), f"receive-ahead-{self.index}")

    def open(self, qm: QueueMessage) -> tuple[Lease, Message, int] | None:
        """Lease and Message for a received message, or None when it went straight to poison.

        Whatever goes wrong opening one message affects that message only: it is poisoned with the reason
        (or, if even that fails, left to reappear after its lease).
        """
        try:
            return self._open(qm)
        except Exception:
            log.exception("could not open or poison message %s; it reappears after its lease", qm.id)
            return None

    def _open(self, qm: QueueMessage) -> tuple[Lease, Message, int] | None:
        text = qm.content or ""
        try:
            envelope, body = self.shared.codec.open(text, qm.id)
        except UndecodableMessage as exc:
            self.poison(self.lease(qm, Envelope(text)), f"undecodable ({self.settings.message_encoding}): {exc}",
                        qm.dequeue_count, qm.inserted_on)
            return None
        except Exception as exc:  # a bug here must not send the whole batch back every cycle
            log.exception("could not open message %s", qm.id)
            self.poison(self.lease(qm, Envelope(text)), f"could not be opened: {type(exc).__name__}: {exc}",
                        qm.dequeue_count, qm.inserted_on)
            return None
        dequeue_count = qm.dequeue_count or 1
        if envelope.upgraded:
            # A version-1 envelope: its release count is not trusted, so its earlier attempts are not counted
            # at all (once: the next settle rewrites it in the current form).
            envelope = replace(envelope, releases=dequeue_count - 1)
        earlier = self.shared.leases.earlier(qm.id)
        if earlier is not None and earlier.supersede():
            # Its lease ran out while it waited here (this receipt replaced that one): that delivery never ran.
            log.warning("message %s was handed out again while this worker held it unstarted: the earlier delivery "
                        "is dropped and counted as released", qm.id)
            envelope = replace(envelope, releases=envelope.releases + 1)
        elif earlier is not None:  # its handler runs (or settles) here with a receipt the queue no longer accepts
            log.warning("message %s was handed out again while this worker still runs it (its lease ran out); "
                        "the earlier run's final call will find its lease lost", qm.id)
        lease = self.lease(qm, envelope)
        if self.shared.lease_slots is not None and lease.slot is None:
            # Held without a slot, nothing could renew it while a handler holds the GIL: give it back instead.
            log.warning("no slot in the shared lease table for message %s; giving it back", qm.id)
            if lease.release():
                self.shared.counters.add("released")
            return None
        prior_failures = judged_failures(envelope, dequeue_count, self.settings.max_dequeue_count)
        if prior_failures >= self.settings.max_dequeue_count:
            self.poison(lease, f"{prior_failures} earlier attempts failed or crashed (max_dequeue_count {self.settings.max_dequeue_count})",
                        dequeue_count, qm.inserted_on)
            return None
        self.shared.leases.add(lease)
        return lease, Message(qm.id, body, dequeue_count, qm.inserted_on), prior_failures

    def lease(self, qm: QueueMessage, envelope: Envelope) -> Lease:
        return Lease(self.client, self.shared.codec, qm.id, qm.pop_receipt or "", envelope, self.settings.visibility_timeout_s,
                     self.shared.lease_slots)

    def run_handler(self, lease: Lease, message: Message, prior_failures: int) -> None:
        shared = self.shared
        ctx = Context(lease, shared.codec, shared.stop, handler_log)
        with shared.counters.lock:
            shared.counters.running += 1
        shared.telemetry.inflight(1)
        started = time.perf_counter()
        outcome = "failed"
        try:
            with shared.telemetry.message_span(message.id, message.dequeue_count, self.settings.name) as span:
                outcome = self.call_handler(message, ctx, span)
        finally:
            with shared.counters.lock:
                shared.counters.running -= 1
            shared.telemetry.inflight(-1)
            duration = time.perf_counter() - started
            self.observe_duration(duration)
        if outcome == "succeeded":
            self.settle(lease, outcome, lease.delete, duration)
        elif outcome == "interrupted":
            self.settle_release(lease, outcome, duration)
        else:
            self.settle_failure(lease, prior_failures + 1, message, duration)

    def call_handler(self, message: Message, ctx: Context, span: Any) -> str:
        try:
            self.shared.handler(message, ctx)
        except Interrupted:
            return "interrupted"
        except BaseException as exc:  # SystemExit from a handler is a failed message, not a dead consumer
            mark_failed(span, exc)
            handler_log.warning("handler failed on message %s (attempt %d): %s: %s", message.id, message.dequeue_count,
                                type(exc).__name__, exc, exc_info=not isinstance(exc, ProgramFailed))  # no traceback: ours
            self.last_error = " ".join(f"{type(exc).__name__}: {exc}".split())  # for the poison note, one line
            return "failed"
        return "succeeded"

    def settle(self, lease: Lease, outcome: str, action: Callable[[], bool], handler_s: float | None = None) -> None:
        """Run the final queue call for a message on the settler (waiting for a slot when it is busy); a lost
        lease or a queue error leaves it on the queue. The outcome is counted once the queue confirmed it."""
        if not lease.begin_settling():  # ended meanwhile: nothing left to do
            if lease.released:  # at the deadline, and counted then: once is enough
                self.shared.leases.remove(lease)
                if handler_s is not None:
                    self.shared.telemetry.record_message("released", handler_s)
            else:
                self.settled(lease, "lease_lost", handler_s)
            return

        def call() -> None:
            try:
                done = action()
            except Exception as exc:
                log.warning("could not settle message %s as %s (%s); it reappears after its lease", lease.id, outcome, describe(exc))
                lease.finish_without_call()
                done = False
            self.settled(lease, outcome if done else "lease_lost", handler_s)

        self.shared.settler.submit(call)

    def settled(self, lease: Lease, outcome: str, handler_s: float | None) -> None:
        self.shared.leases.remove(lease)
        self.shared.counters.add(outcome)
        if handler_s is not None:
            self.shared.telemetry.record_message(outcome, handler_s)

    def settle_release(self, lease: Lease, outcome: str, handler_s: float) -> None:
        if self.shared.stop.is_set():
            self.settle(lease, outcome, lease.release, handler_s)
            return
        # Interrupted outside a drain: given back after a short growing delay, not at once (which would
        # redeliver it tens of times a second, two billable requests each).
        delay = interruption_delay_s(lease.envelope.releases)
        self.settle(lease, outcome, lambda: lease.release(delay_s=delay), handler_s)

    def settle_failure(self, lease: Lease, failures: int, message: Message, handler_s: float) -> None:
        if failures >= self.settings.max_dequeue_count:
            last = f"; last: {self.last_error}" if self.last_error else ""
            self.poison(lease, f"handler failed {failures} times (max_dequeue_count {self.settings.max_dequeue_count}){last}",
                        message.dequeue_count, message.inserted_on, handler_s)
            return
        delay = retry_delay_s(failures, self.settings.retry_delay_s, self.settings.retry_delay_max_s)
        self.settle(lease, "failed", lambda: lease.retry_later(delay), handler_s)

    def poison(self, lease: Lease, reason: str, dequeue_count: int | None = None, inserted_on: datetime | None = None,
               handler_s: float | None = None) -> None:
        text = poisoned_text(lease.envelope.original, reason, lease.id, dequeue_count, inserted_on)

        def move() -> bool:
            moved = lease.move_to(self.shared.poison_client(), text)
            if moved:  # said once it happened, not before (a move that fails leaves it on the queue)
                log.error("message %s moved to %s: %s", lease.id, self.settings.poison_name, reason)
            return moved

        self.settle(lease, "poisoned", move, handler_s)


def most_held(threads: int, settings: QueueSettings) -> int:
    """The most messages one worker process can hold at once: per consumer thread, its batch and the next one
    received ahead (settling messages of its batch included), plus the final calls of earlier batches still
    under way (at most max_outstanding_settles: the settler makes consumers wait beyond that)."""
    return max(1, threads) * 2 * settings.batch_size + settings.max_outstanding_settles


def judged_failures(envelope: Envelope, dequeue_count: int, max_dequeue_count: int) -> int:
    """The earlier attempts of a message that count toward poison.

    A failure (the handler ran and raised, or its program failed) is recorded in the message by the retry's
    update, and counts in full; a release never counts. A delivery the message does not account for ended
    without a settle of ours: either its consumer died with it (a crash, a kill, the VM lost), or its lease
    ran out before its handler started (a stuck or cut-off worker). The message cannot tell the two apart,
    and a delivery that never ran must not count, yet a message that kills its worker every time must end
    in poison rather than loop forever. So unaccounted deliveries count only beyond a grace of
    max_dequeue_count: such a message is poisoned after about twice max_dequeue_count deliveries, and leases
    lost for any other reason do not move a message toward poison until that many were lost.
    """
    unaccounted = max(0, dequeue_count - 1 - envelope.releases - envelope.failures)
    return envelope.failures + max(0, unaccounted - max_dequeue_count)


def release_pending(shared: Shared) -> int:
    """Give back every received-but-unstarted message at once (visibility 0); returns how many."""
    released = shared.leases.release(running_too=False)
    shared.counters.add("released", released)
    return released


def release_all(shared: Shared) -> int:
    """At the deadline: give back everything, running handlers' messages included (see LeaseTable.release)."""
    released = shared.leases.release(running_too=True)
    shared.counters.add("released", released)
    return released
