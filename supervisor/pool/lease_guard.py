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
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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


class LeaseGuard(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="lease-guard", daemon=True)
        self._workers: dict[int, WatchedWorker] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._clients: dict[tuple[str, str, str], QueueClient] = {}
        self._pool = ThreadPoolExecutor(MAX_CONCURRENT_CALLS, thread_name_prefix="lease-guard-call")
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

    def worker_exited(self, pid: int, cut_short: bool) -> int:
        """Give back at once what the worker still held; returns how many. Blocks for at most one request's timeout."""
        with self._lock:
            worker = self._workers.pop(pid, None)
        if worker is None:
            return 0
        held = []
        for index in worker.slots.held_indices():
            with worker.slots.locked(index):  # the worker is gone, and the kernel dropped its locks
                message = worker.slots.read(index)
            if message is not None:
                held.append(message)
        timeout = self._request_timeout(worker)
        results = list(self._pool.map(lambda m: self._give_back(worker, m, cut_short, timeout), held))
        worker.slots.close()
        given = sum(results)
        if held:
            log.warning("worker %d exited holding %d message(s): %d given back %s", pid, len(held), given,
                        "with their release recorded" if cut_short else "(the attempt counts as failed)")
        return given

    def stop(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- the guard's own thread

    def run(self) -> None:
        while not self._stopping.wait(self.tick_s):
            with self._lock:
                workers = list(self._workers.values())
            for worker in workers:
                self._renew_stale(worker)

    def _renew_stale(self, worker: WatchedWorker) -> None:
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

    def _give_back(self, worker: WatchedWorker, message: HeldMessage, cut_short: bool, timeout: float) -> bool:
        content = message.release_text if cut_short else None
        try:
            worker.client.update_message(message.message_id, message.pop_receipt, content=content, visibility_timeout=0,
                                         connection_timeout=timeout, read_timeout=timeout)
        except Exception as exc:  # it reappears after its lease, as it would have anyway
            log.warning("could not give back message %s of worker %d: %s", message.message_id, worker.pid, describe(exc))
            return False
        return True

    def _client(self, settings: QueueSettings) -> QueueClient:
        key = (settings.connection_string, settings.account_url, settings.name)
        with self._lock:
            if key not in self._clients:
                self._clients[key] = make_queue_client(settings)
            return self._clients[key]

    @staticmethod
    def _request_timeout(worker: WatchedWorker) -> float:
        return renewal_timeout_s(worker.visibility_timeout_s, 10.0)
