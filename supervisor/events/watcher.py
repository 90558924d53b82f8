"""The one Scheduled Events thread: learns this VM's name, polls, turns documents into decisions.

Built before the arbiter and handed to it; the arbiter starts it with `watch(on_decision)`
and asks it to `acknowledge`. Every result reaches the arbiter as a decision through
`on_decision`, which only queues it and wakes the main loop. A failed poll is only
ever a failed poll: it is retried, never read as "evicted" nor as "nothing pending".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from supervisor.config import EventsSettings
from supervisor.events.eviction import Acknowledged, Decision, EvictionPolicy
from supervisor.events.sources import EventSource
from supervisor.retry_after import honour_retry_after
from supervisor.vm.imds import ImdsError
from supervisor.vm.planning import INSTANCE_TIMEOUT_S
from worker.common.backoff import Backoff

log = logging.getLogger(__name__)

FAILURE_WARNING_EVERY_S = 60.0  # while polls keep failing, one WARNING a minute; the others at DEBUG


class EventWatcher(threading.Thread):
    def __init__(self, source: EventSource, settings: EventsSettings, vm_name: str, *,
                 backoff: Backoff | None = None, clock: Callable[[], float] = time.time,
                 name_backoff: Backoff | None = None, warning_every_s: float = FAILURE_WARNING_EVERY_S) -> None:
        super().__init__(name="scheduled-events", daemon=True)
        self._source = source
        self.settings = settings
        self.vm_name = vm_name  # "" until instance metadata answers
        self._poll_interval_s = settings.poll_interval_s
        # A short cap: while IMDS misbehaves we still look often enough to catch a 30 s eviction notice.
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=max(4.0, settings.poll_interval_s))
        self._clock = clock
        self._stopping = threading.Event()
        self._on_decision: Callable[[Decision], None] = lambda decision: None
        self._policy: EvictionPolicy | None = None
        self.incarnation: int | None = None
        self.last_success: float | None = None
        self.consecutive_failures = 0
        self._next_failure_warning = 0.0
        self._warning_every_s = warning_every_s
        self._name_backoff = name_backoff or Backoff(base_s=1.0, cap_s=30.0)
        self._problems_logged: set[str] = set()

    def watch(self, on_decision: Callable[[Decision], None]) -> None:
        """Start the thread; `on_decision` runs on it (and on acknowledgement threads): it should only queue."""
        self._on_decision = on_decision
        self.start()

    def stop(self, timeout_s: float | None = 5.0) -> None:
        """Ask the thread to end and wait for it (a request in flight ends at its timeout)."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        try:
            if not self._learn_vm_name():
                return
            self._policy = EvictionPolicy(self.vm_name, self.settings, self._source.acknowledges)
            log.info("watching %s for %s (drain on %s)", self._source.name,
                     self.vm_name, ", ".join(self.settings.drain_on))
            while not self._stopping.is_set():
                self._stopping.wait(self.poll_once())
        except BaseException:  # the arbiter notices the dead thread (Arbiter.check_watcher) and stops the service
            log.critical("the Scheduled Events watcher died", exc_info=True)
            raise

    def _learn_vm_name(self) -> bool:
        """Until instance metadata names this VM (it may not answer at boot); False when stopped first."""
        failures = 0
        while not self.vm_name:
            if self._stopping.wait(self._name_backoff.next_delay()):
                return False
            try:
                self.vm_name = self._source.instance_info(INSTANCE_TIMEOUT_S).name
                log.info("instance metadata answered: this VM is %s", self.vm_name)
            except ImdsError as exc:
                failures += 1
                # Not only once: a wrong endpoint leaves evictions unwatched for as long as the service runs.
                log.log(self._failure_level(), "%s: instance metadata unavailable (%d attempt(s)): %s; evictions "
                        "are not watched until it answers", self._source.name, failures, exc)
        return not self._stopping.is_set()

    def _failure_level(self) -> int:
        """WARNING once per warning interval while failures go on, DEBUG in between."""
        now = time.monotonic()
        if now < self._next_failure_warning:
            return logging.DEBUG
        self._next_failure_warning = now + self._warning_every_s
        return logging.WARNING

    def poll_once(self) -> float:
        """One poll and its consequences; returns how long to wait before the next."""
        if self._policy is None:
            self._policy = EvictionPolicy(self.vm_name, self.settings, self._source.acknowledges)
        try:
            document = self._source.poll()
        except ImdsError as exc:
            return self._failed(str(exc), exc.retry_after_s)
        except Exception as exc:  # a bug must not end eviction watching
            log.exception("scheduled events poll raised unexpectedly")
            return self._failed(f"{type(exc).__name__}: {exc}", None)

        if self.consecutive_failures:
            log.info("scheduled events answering again after %d failed poll(s)", self.consecutive_failures)
        self.consecutive_failures = 0
        self._backoff.reset()
        self.last_success = self._clock()
        if document.incarnation != self.incarnation:
            log.info("scheduled events incarnation %s -> %s: %d event(s)",
                     self.incarnation, document.incarnation, len(document.events))
            self.incarnation = document.incarnation
        self._log_problems(document.problems)
        try:
            decisions = self._policy.observe(document, self._clock())
        except Exception:
            log.exception("eviction policy failed on incarnation %s", document.incarnation)
            return self._poll_interval_s
        for decision in decisions:
            self._report(decision)
        return self._source.next_poll_in(self._poll_interval_s)

    def acknowledge(self, event_id: str) -> None:
        """POST StartRequests on a thread of its own (the main loop never waits on IMDS);
        the outcome arrives as an `Acknowledged` decision."""

        def post() -> None:
            try:
                self._source.acknowledge(event_id)
            except Exception as exc:  # ImdsError, or a bug: either way a failed attempt the arbiter may retry
                self._report(Acknowledged(event_id, str(exc) or type(exc).__name__))
            else:
                self._report(Acknowledged(event_id, None))

        threading.Thread(target=post, name=f"acknowledge-{event_id[:8]}", daemon=True).start()

    def _report(self, decision: Decision) -> None:
        try:
            self._on_decision(decision)
        except Exception:
            log.exception("on_decision callback failed for %r", decision)

    def _log_problems(self, problems: tuple[str, ...]) -> None:
        """Each unreadable event once, not on every poll."""
        for problem in problems:
            if problem not in self._problems_logged:
                if len(self._problems_logged) >= 1000:
                    self._problems_logged.clear()
                self._problems_logged.add(problem)
                log.warning("%s", problem)

    def _failed(self, message: str, retry_after_s: float | None) -> float:
        self.consecutive_failures += 1
        # Retry-After is honoured, but never beyond the cap: missing an eviction notice
        # costs more than a few extra requests to a throttled IMDS.
        delay = honour_retry_after(self._backoff.next_delay(), retry_after_s, self._backoff.cap_s)
        log.log(self._failure_level(), "scheduled events poll failed (%d in a row), retrying in %.1fs: %s; "
                "evictions are not watched until it answers", self.consecutive_failures, delay, message)
        return delay
