"""The supervisor's main loop, in the manner of gunicorn's arbiter.

Signal handlers and the Scheduled Events thread only record what happened and
wake the loop; the loop alone spawns, reaps, drains, acknowledges and exits.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import time
from collections.abc import Callable
from types import FrameType

from supervisor import sdnotify
from supervisor.config import SupervisorSettings
from supervisor.drain import DrainInProgress, DrainPhase, Outcome, why_not_acknowledged
from supervisor.event_watcher import EventWatcher
from supervisor.eviction import Acknowledged, Decision, EvictionNotice, NoticeWithdrawn
from supervisor.sizing import Plan
from supervisor.workers import WorkerPool
from worker.control import Kind
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


class Arbiter(WorkerPool):
    def __init__(self, settings: SupervisorSettings, plan: Plan, telemetry: Telemetry, attributes: dict[str, str],
                 reload: Callable[[], tuple[SupervisorSettings, Plan]] | None = None,
                 events: EventWatcher | None = None) -> None:
        super().__init__(settings, plan, telemetry, attributes, reload)
        self.events = events  # None when not watching Scheduled Events
        self.signals: list[int] = []
        self.decisions: queue.SimpleQueue[Decision] = queue.SimpleQueue()
        self.notified_ready = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_status = 0.0
        self._watchdog_s = sdnotify.watchdog_interval_s()
        self._next_watchdog = 0.0

    # --- inputs: signals and decisions only record, then wake the loop

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def submit(self, decision: Decision) -> None:
        """Called from the Scheduled Events watcher's threads."""
        self.decisions.put(decision)
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def own_fds(self) -> list[int]:
        return [self._wake_r, self._wake_w]

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    # --- the loop

    def run(self) -> int:
        self.install_signals()
        if self.events is not None:
            self.events.watch(self.submit)
        log.info("supervisor %d starting %d %s worker(s) x %d thread(s) for queue %s",
                 os.getpid(), self.target, self.plan.mode, self.plan.threads, self.settings.queue.name)
        self.manage_workers()
        while self.exit_code is None:
            self.sleep()
            self.handle_signals()
            self.handle_decisions()
            self.read_channels()
            self.reap_workers()
            if self.exit_code is not None:
                break
            self.manage_workers()
            self.check_drain()
            self.notify_systemd()
        self.finish()
        return self.exit_code

    def sleep(self) -> None:
        fds = [self._wake_r] + [w.channel.fileno() for w in self.workers.values() if not w.channel.closed]
        timeout = 0.05 if self.drain_state else 0.5
        if self._watchdog_s:  # wake in time for the next ping, however short WatchdogSec= is
            timeout = max(0.0, min(timeout, self._next_watchdog - time.time()))
        try:
            select.select(fds, [], [], timeout)
        except (InterruptedError, ValueError):
            pass
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGCHLD:
                continue  # reap_workers runs on every turn
            name = signal.Signals(signum).name
            holding = self.drain_state is not None and self.drain_state.phase is DrainPhase.HOLDING
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) and holding:
                log.info("%s while holding after a drain: exiting", name)
                self.exit_code = 0
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.drain_workers(f"{name}", time.time() + self.settings.shutdown.drain_timeout_s, stop=True)
            elif signum == signal.SIGQUIT:
                self.drain_workers(f"{name} (fast stop)", time.time(), stop=True)
            elif signum == signal.SIGHUP:
                self.reload()
            elif signum == signal.SIGTTIN:
                self.scale(self.target + 1)
            elif signum == signal.SIGTTOU:
                self.scale(self.target - 1)

    def handle_decisions(self) -> None:
        while True:
            try:
                decision = self.decisions.get_nowait()
            except queue.Empty:
                return
            if isinstance(decision, EvictionNotice):
                self.on_eviction_notice(decision)
            elif isinstance(decision, NoticeWithdrawn):
                self.on_notice_withdrawn(decision)
            elif isinstance(decision, Acknowledged):
                self.on_acknowledged(decision)

    # --- drain

    def drain_workers(self, reason: str, deadline: float, notice: EvictionNotice | None = None, stop: bool = False) -> None:
        """Every worker: stop receiving, give back unstarted messages, finish by the deadline."""
        state = self.drain_state
        if state is not None:
            state.stop_requested |= stop
            if deadline < state.deadline:
                state.deadline = deadline
                for handle in self.workers.values():
                    handle.channel.send(Kind.DRAIN, deadline=deadline)
            if notice is not None and state.notice is None:
                state.notice = notice
            return
        now = time.time()
        self.drain_state = DrainInProgress(reason, deadline, now, notice, stop_requested=stop, waiting_for=set(self.workers))
        log.info("drain (%s): %d worker(s), deadline in %.1fs", reason, len(self.workers), deadline - now)
        sdnotify.stopping(f"draining: {reason}")
        for handle in self.workers.values():
            handle.retiring = True
            handle.channel.send(Kind.DRAIN, deadline=deadline)

    def on_eviction_notice(self, notice: EvictionNotice) -> None:
        event = notice.event
        self.metrics.record_eviction_notice(event.event_type)
        log.warning("%s %s (%s) for this VM, NotBefore %s: draining", event.event_type, event.event_id,
                    event.status, event.not_before.isoformat() if event.not_before else "now")
        self.drain_workers(f"{event.event_type} {event.event_id}", notice.deadline, notice)

    def on_notice_withdrawn(self, withdrawn: NoticeWithdrawn) -> None:
        state = self.drain_state
        if state is None or state.notice is None or state.notice.event_id != withdrawn.event_id:
            return
        if state.stop_requested:
            log.info("event %s was cancelled, but a stop was requested: draining on", withdrawn.event_id)
            state.notice = None
            return
        log.warning("event %s was cancelled (%s): resuming processing", withdrawn.event_id, withdrawn.reason)
        self.resume()

    def resume(self) -> None:
        self.drain_state = None
        self.respawn_at.clear()
        self.slot_crashes.clear()
        sdnotify.ready("processing resumed")

    def worker_stopped_receiving(self, pid: int, at: float | None) -> None:
        """Called per worker report (at set) or exit (at None); logs once when the last one is in."""
        state = self.drain_state
        if state is not None and state.worker_stopped_receiving(pid, at) and state.stopped_receiving_at is not None:
            log.info("drain: every worker stopped receiving %.3fs after the drain began",
                     max(0.0, state.stopped_receiving_at - state.started_at))

    def check_drain(self) -> None:
        state = self.drain_state
        if state is None:
            return
        now = time.time()
        if not self.workers:
            if state.phase is not DrainPhase.HOLDING:
                self.drained(state, now)
            return
        if now >= state.deadline and state.phase is DrainPhase.DRAINING:
            state.phase = DrainPhase.ABANDONED
            log.warning("drain deadline reached: %d worker(s) still busy, releasing their messages", len(self.workers))
            for handle in self.workers.values():
                handle.channel.send(Kind.ABANDON)
        if now >= state.deadline + self.settings.shutdown.kill_grace_s and state.phase is DrainPhase.ABANDONED:
            state.phase = DrainPhase.KILLED
            for handle in self.workers.values():
                log.error("worker %d did not exit %.1fs after the deadline: killing it", handle.pid, self.settings.shutdown.kill_grace_s)
                self.kill_worker(handle.pid, signal.SIGKILL)

    def drained(self, state: DrainInProgress, now: float) -> None:
        """No worker left: acknowledge if we should (never waiting for it here), then exit, resume or hold."""
        if state.drained_at is None:
            state.drained_at = now
            self.metrics.record_drain(now - state.started_at, state.reason)
            log.info("drained in %.3fs (%s)", now - state.started_at, state.reason)
            if state.notice is not None and not state.needs_ack(self.events is not None):
                log.info("not acknowledging %s: %s", state.notice.event_id, why_not_acknowledged(state.notice))
        if state.needs_ack(self.events is not None):
            if not state.ack_in_flight and now >= state.next_ack_at:
                self.ack_event(state)
            return
        if state.ack_in_flight:
            return
        log.info("drain timeline %s", state.timeline())
        outcome = state.outcome()
        if outcome is Outcome.RESUME:
            assert state.notice is not None
            log.info("%s %s: resuming processing", state.notice.event.event_type.lower(), state.notice.event_id)
            self.resume()
        elif outcome is Outcome.HOLD:
            assert state.notice is not None
            state.phase = DrainPhase.HOLDING
            log.info("drained; holding until %s starts or is cancelled", state.notice.event_id)
            sdnotify.status(f"drained, holding for {state.notice.event_id}")
        else:
            self.exit_code = 0

    def ack_event(self, state: DrainInProgress) -> None:
        """Start one acknowledgement attempt; `on_acknowledged` hears how it ended."""
        assert self.events is not None and state.notice is not None
        state.ack_in_flight = True
        self.events.acknowledge(state.notice.event_id)

    def on_acknowledged(self, result: Acknowledged) -> None:
        state = self.drain_state
        if state is None or state.notice is None or state.notice.event_id != result.event_id:
            return
        now = time.time()
        if result.error is not None:
            state.ack_failed(now)
            log.warning("acknowledging %s failed (attempt %d): %s", result.event_id, state.ack_attempts, result.error)
            return
        state.ack_in_flight = False
        state.acknowledged_at = now
        log.info("acknowledged %s %.3fs after the last worker exited", result.event_id, now - (state.drained_at or now))

    # --- systemd and the end

    def notify_systemd(self) -> None:
        now = time.time()
        if not self.notified_ready and self.workers and all(w.ready for w in self.workers.values()):
            self.notified_ready = True
            sdnotify.ready(self.status_line())
            log.info("ready: %d worker(s) running", len(self.workers))
        if now >= self._next_status:
            self._next_status = now + 5.0
            sdnotify.status(self.status_line())
        if self._watchdog_s and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_s / 2
            sdnotify.watchdog()

    def status_line(self) -> str:
        t = self.totals()
        running = sum(int(w.stats.get("running", 0)) for w in self.workers.values())
        state = f"draining ({self.drain_state.reason})" if self.drain_state else "running"
        return (f"{state}: {len(self.workers)} worker(s), {running} in flight, {t.get('succeeded', 0)} done, "
                f"{t.get('failed', 0)} failed, {t.get('poisoned', 0)} poisoned, {t.get('released', 0) + t.get('interrupted', 0)} released")

    def finish(self) -> None:
        for pid in list(self.workers):
            self.kill_worker(pid, signal.SIGKILL)
        log.info("supervisor exiting (%d): %s", self.exit_code, self.status_line())

