"""The supervisor's lease guard: renews what a worker cannot, and gives back what a dead worker held.

A worker renews its own leases from a thread, which stops while a handler holds
the GIL (a C extension, a catastrophic regex): past the visibility timeout the
message would go to another consumer, run again, and the attempt that was
succeeding would count toward poison. The guard reads each worker's shared
lease table (worker.queue.lease_slots) and renews any lease the worker has let go
stale, under the slot's lock, so the two never race on a pop receipt.

When a worker exits still holding messages (killed at the drain deadline, or
crashed), the guard makes them visible again at once. Cut short by a drain or
a retirement, they are given back with their release recorded (the text the
worker kept in the slot), so the eviction is not counted as a failure; after a
crash, without it (a crash counts as a failed attempt, as it always has).

The give-back runs on the guard's call threads, never on the supervisor's main
loop: with the queue hanging it would hold up every decision, signal and
acknowledgement for as long as the calls take. It is bounded: one attempt per
message (no SDK retries stacking up), at most MAX_CONCURRENT_CALLS at a time,
and nothing starts once the message's lease would have run out anyway: what
is not given back reappears after its lease, as after any crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from azure.storage.queue import QueueClient

from worker.queue.client import describe, is_lease_lost, make_queue_client
from worker.queue.consumer import most_held
from worker.queue.lease import renewal_timeout_s
from worker.queue.lease_slots import HeldMessage, LeaseSlots
from worker.settings import QueueSettings

log = logging.getLogger(__name__)

TAKE_OVER_AFTER = 0.7  # of the visibility timeout; the worker itself renews at half
MAX_CONCURRENT_CALLS = 8


class WatchedWorker:
    def __init__(self, pid: int, slots: LeaseSlots, client: QueueClient, visibility_timeout_s: int) -> None:
        self.pid = pid
        self.slots = slots
        self.client = client
        self.visibility_timeout_s = visibility_timeout_s
        self.warned: set[str] = set()  # message ids already logged as renewed for this worker
        self.given_up: set[tuple[str, str]] = set()  # (id, receipt) the queue refused: settled or lost meanwhile
        self.lock = threading.Lock()  # held while its table is read: the give-back closes the table under it
        self.exited = False


class GiveBack:
    """What one exited worker still held, on its way back to the queue; logs once every call has ended."""

    def __init__(self, worker: WatchedWorker, cut_short: bool, held: list[HeldMessage]) -> None:
        self.worker = worker
        self.cut_short = cut_short
        self.held = held
        self._lock = threading.Lock()
        self._left = len(held)
        self.given = 0

    def ended(self, given: bool) -> None:
        with self._lock:
            self._left -= 1
            self.given += given
            if self._left:
                return
        log.warning("worker %d exited holding %d message(s): %d given back %s", self.worker.pid, len(self.held),
                    self.given, "with their release recorded" if self.cut_short else "(the attempt counts as failed)")


class LeaseGuard(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="lease-guard", daemon=True)
        self._workers: dict[int, WatchedWorker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._clients: dict[tuple[str, str, str], QueueClient] = {}
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_CALLS, thread_name_prefix="lease-guard-call")
        self._in_flight: set[Future[object]] = set()  # give-backs not ended yet
        self.renewals = 0  # made on a worker's behalf (for tests and the log)
        self.tick_s = 0.5

    # -- called from the arbiter's loop

    @staticmethod
    def new_table(threads: int, settings: QueueSettings) -> LeaseSlots:
        """Before fork: room for everything one worker can hold."""
        return LeaseSlots(most_held(threads, settings))

    def watch(self, pid: int, slots: LeaseSlots, settings: QueueSettings) -> None:
        client = self._client(settings)
        with self._lock:
            self._workers[pid] = WatchedWorker(pid, slots, client, settings.visibility_timeout_s)
            self.tick_s = min(self.tick_s, max(0.05, settings.visibility_timeout_s / 10))

    def worker_exited(self, pid: int, cut_short: bool) -> None:
        """Give back what the worker still held, from the guard's call threads: returns at once."""
        with self._lock:
            worker = self._workers.pop(pid, None)
        if worker is not None:
            self._submit(self._collect, worker, cut_short)

    def stop(self, wait_s: float = 0.0) -> None:
        """Waits up to wait_s for give-backs under way (the process is about to exit), then drops the rest."""
        self._stopping.set()
        deadline = time.monotonic() + wait_s
        while (left := deadline - time.monotonic()) > 0:
            with self._lock:
                pending = set(self._in_flight)
            if not pending:
                break
            wait(pending, timeout=left)  # a collect ending submits its calls: look again
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _submit(self, call: Callable[..., object], *args: object) -> None:
        future: Future[object] = self._pool.submit(call, *args)
        with self._lock:
            self._in_flight.add(future)
        future.add_done_callback(self._ended)

    def _ended(self, future: Future[object]) -> None:
        with self._lock:
            self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("giving back a dead worker's messages failed", exc_info=future.exception())

    def _collect(self, worker: WatchedWorker, cut_short: bool) -> None:
        """What the worker held, read from its table (then closed); one call per message."""
        with worker.lock:  # waits for a renewal of its messages under way
            worker.exited = True
            held = []
            for index in worker.slots.held_indices():
                with worker.slots.locked(index):  # the worker is gone, and the kernel dropped its locks
                    message = worker.slots.read(index)
                if message is not None:
                    held.append(message)
            worker.slots.close()
        give_back = GiveBack(worker, cut_short, held)
        for message in held:
            self._submit(self._give_back, give_back, message)

    # -- the guard's own thread

    def run(self) -> None:
        while not self._stopping.wait(self.tick_s):
            with self._lock:
                workers = list(self._workers.values())
            for worker in workers:
                self._renew_stale(worker)

    def _renew_stale(self, worker: WatchedWorker) -> None:
        with worker.lock:
            if not worker.exited:
                self._renew_stale_slots(worker)

    def _renew_stale_slots(self, worker: WatchedWorker) -> None:
        now = time.monotonic()
        due = TAKE_OVER_AFTER * worker.visibility_timeout_s
        for index in worker.slots.held_indices():
            if now - worker.slots.renewed_at(index) < due:
                continue
            if not worker.slots.try_lock(index):  # the worker is calling the queue for it: not stuck
                continue
            try:
                message = worker.slots.read(index)
                if message is not None and (message.message_id, message.pop_receipt) in worker.given_up:
                    continue
                if message is not None and time.monotonic() - message.renewed_at >= due:
                    self._renew(worker, message)
            finally:
                worker.slots.unlock(index)

    def _renew(self, worker: WatchedWorker, message: HeldMessage) -> None:
        """Caller holds the slot's lock."""
        if message.message_id not in worker.warned:
            worker.warned.add(message.message_id)
            log.warning("worker %d has not renewed the lease of message %s for %.1fs (a handler holding the GIL?): "
                        "renewing it on the worker's behalf", worker.pid, message.message_id,
                        time.monotonic() - message.renewed_at)
        timeout = self._request_timeout(worker)
        try:
            receipt = worker.client.update_message(message.message_id, message.pop_receipt,
                                                   visibility_timeout=message.visibility_timeout_s,
                                                   connection_timeout=timeout, read_timeout=timeout, retry_total=0)
        except Exception as exc:
            if is_lease_lost(exc):  # settled or lost meanwhile: the worker finds out on its next call
                log.info("lease of message %s (worker %d) is no longer valid: %s", message.message_id, worker.pid, describe(exc))
                worker.given_up.add((message.message_id, message.pop_receipt))
            else:
                log.warning("renewing message %s for worker %d failed: %s", message.message_id, worker.pid, describe(exc))
            return
        worker.slots.record(message.index, receipt.pop_receipt or message.pop_receipt, time.monotonic())
        self.renewals += 1

    def _give_back(self, give_back: GiveBack, message: HeldMessage) -> None:
        worker = give_back.worker
        if time.monotonic() >= message.renewed_at + message.visibility_timeout_s:
            give_back.ended(False)  # its lease ran out while the call waited for a thread: it is back by itself
            return
        content = message.release_text if give_back.cut_short else None
        timeout = self._request_timeout(worker)
        try:
            worker.client.update_message(message.message_id, message.pop_receipt, content=content, visibility_timeout=0,
                                         connection_timeout=timeout, read_timeout=timeout, retry_total=0)
        except Exception as exc:  # it reappears after its lease, as it would have anyway
            log.warning("could not give back message %s of worker %d: %s", message.message_id, worker.pid, describe(exc))
            give_back.ended(False)
            return
        give_back.ended(True)

    def _client(self, settings: QueueSettings) -> QueueClient:
        key = (settings.connection_string, settings.account_url, settings.name)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make_queue_client(settings)
            return self._clients[key]

    @staticmethod
    def _request_timeout(worker: WatchedWorker) -> float:
        return renewal_timeout_s(worker.visibility_timeout_s, 10.0)
