"""One worker process's consumers: T consumer threads, a lease keeper; stop receiving, abandon."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from worker.handler import call_hook, load_workload
from worker.message import Codec
from worker.queue.consumer import Consumer, Shared, release_all, release_pending
from worker.queue.lease import LeaseKeeper
from worker.queue.lease_slots import LeaseSlots
from worker.settings import Settings
from worker.telemetry.providers import Telemetry

log = logging.getLogger(__name__)

RECEIVE_GRACE_S = 2.0
SETTLE_WAIT_S = 2.0  # at exit, for final queue calls still under way (within the supervisor's kill grace)


class WorkerRuntime:
    def __init__(self, settings: Settings, telemetry: Telemetry, threads: int = 1,
                 lease_slots: LeaseSlots | None = None) -> None:
        """Raises WorkloadError when the workload cannot run."""
        handler = load_workload(settings.workload)
        self.settings = settings
        self.shared = Shared(settings.queue, handler, telemetry, Codec(settings.queue.message_encoding),
                             lease_slots=lease_slots)
        self.threads_wanted = threads
        self.consumer_threads: list[threading.Thread] = []
        self._keeper_stop = threading.Event()
        self.keeper = LeaseKeeper(self.shared.leases, settings.queue.visibility_timeout_s, self._keeper_stop,
                                 settings.queue.request_timeout_s)
        self.abandoned = False

    def start(self) -> None:
        self.keeper.start()
        for index in range(self.threads_wanted):
            consumer = Consumer(self.shared, index)
            thread = threading.Thread(target=self._run_consumer, args=(consumer,), name=f"consumer-{index}", daemon=True)
            thread.start()
            self.consumer_threads.append(thread)

    def _run_consumer(self, consumer: Consumer) -> None:
        try:
            consumer.run()
        except BaseException:
            log.exception("consumer %d crashed; its held messages reappear after their lease", consumer.index)
            raise

    @property
    def deadline(self) -> float | None:
        """When work must have stopped; None until told to stop."""
        return self.shared.stop.deadline

    @property
    def stopped_receiving_at(self) -> float | None:
        return self.shared.stop.set_at

    def stop_receiving(self, deadline: float) -> bool:
        """Stop receiving, give back unstarted messages, let running handlers see ctx.draining.

        True the first time (the moment is then `stopped_receiving_at`); later calls only move the deadline earlier.
        """
        first = self.shared.stop.set(deadline)
        released = release_pending(self.shared)
        if released:
            log.info("drain: released %d unstarted message(s)", released)
        return first

    def abandon(self) -> int:
        """Deadline reached: release everything still held (checkpoints kept) so another VM takes it now."""
        self.stop_receiving(time.time())
        self.abandoned = True
        call_hook(self.shared.handler, "on_abandon")  # e.g. programs killed, last checkpoints stored: released below
        released = release_all(self.shared)
        if released:
            log.warning("deadline: released %d message(s) whose handlers were still running", released)
        return released

    def idle(self) -> bool:
        """After a drain: nothing held, no handler running and no final queue call under way.

        A receive still in flight is waited for a little (what it returns is
        released at once), but not for long: when the queue is failing, the SDK's
        retries must not hold the drain until the deadline.
        """
        if self.shared.settler.outstanding:
            return False
        if not any(t.is_alive() for t in self.consumer_threads):
            return True
        # Receives first: none begins once stopped, so with none under way the table can only shrink.
        receiving = self.shared.stop.receiving > 0
        with self.shared.counters.lock:
            busy = self.shared.counters.running > 0 or len(self.shared.leases) > 0
        if busy:
            return False
        waited = time.time() - (self.stopped_receiving_at or time.time())
        return not receiving or waited >= RECEIVE_GRACE_S

    def crashed(self) -> bool:
        """A consumer thread died outside a drain (a bug): the process should go and be respawned."""
        return not self.shared.stop.is_set() and not all(t.is_alive() for t in self.consumer_threads)

    def close(self) -> None:
        """Stop renewing; wait a little for final queue calls still under way (after an abandon), so what
        the queue confirmed is counted; any call left unfinished leaves its message to reappear."""
        if not self.shared.settler.wait(SETTLE_WAIT_S):
            log.warning("exiting with %d final queue call(s) unfinished; those messages reappear after their lease",
                        self.shared.settler.outstanding)
        self.shared.settler.close()
        self._keeper_stop.set()
        call_hook(self.shared.handler, "close")

    def stats(self) -> dict[str, Any]:
        counts = self.shared.counters.snapshot()
        counts["held"] = len(self.shared.leases)
        return counts
