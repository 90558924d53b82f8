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
from supervisor.events.eviction import Acknowledged, Decision, EvictionNotice, NoticeWithdrawn
from supervisor.events.watcher import EventWatcher
from supervisor.pool.drain import DrainInProgress, DrainPhase, Outcome
from supervisor.pool.metrics import SupervisorMetrics
from supervisor.pool.retirement import Retirement
from supervisor.pool.workers import StoppedReceiving, WorkerPool
from supervisor.vm.sizing import Plan
from worker.common.wake_pipe import WakePipe
from worker.telemetry.providers import Telemetry

log = logging.getLogger(__name__)

GIVE_BACK_AT_EXIT_S = 5.0  # at exit, how long a give-back of a dead worker's messages under way may still take

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)


class Arbiter:
    def __init__(self, settings: SupervisorSettings, plan: Plan, telemetry: Telemetry, attributes: dict[str, str],
                 reload: Callable[[], tuple[SupervisorSettings, Plan]] | None = None,
                 events: EventWatcher | None = None,
                 exit_summary: Callable[[dict[str, int]], str] | None = None,
                 retirement: Retirement | None = None) -> None:
        self.retirement = retirement  # None unless [fleet] retire_when_idle_s > 0
        self.metrics = SupervisorMetrics(telemetry.meter)
        self.wake_pipe = WakePipe()
        self.pool = WorkerPool(settings, plan, telemetry, attributes, self.metrics, reload, close_in_child=self.wake_pipe.fds)
        self.events = events  # None when not watching Scheduled Events
        self.exit_summary = exit_summary  # more for the exit line (uptime, dollars saved), from the totals
        self.signals: list[int] = []
        self.decisions: queue.SimpleQueue[Decision] = queue.SimpleQueue()
        self.drain_state: DrainInProgress | None = None
        self.exit_code: int | None = None
        self.notified_ready = False
        self._next_status = 0.0
        self._watchdog_s = sdnotify.watchdog_interval_s()
        self._next_watchdog = 0.0

    @property
    def settings(self) -> SupervisorSettings:
        return self.pool.settings  # the pool's: a SIGHUP reload replaces them there

    def totals(self) -> dict[str, int]:
        return self.pool.totals()

    # --- inputs: signals and decisions only record, then wake the loop

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def submit(self, decision: Decision) -> None:
        """Called from the Scheduled Events watcher's threads."""
        self.decisions.put(decision)
        self.wake()

    def wake(self) -> None:
        self.wake_pipe.wake()

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_pipe.write_fd)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    # --- the loop

    def run(self) -> int:
        self.install_signals()
        self.pool.start()
        if self.events is not None:
            self.events.watch(self.submit)
        log.info("supervisor %d starting %d %s worker(s) x %d thread(s) for queue %s", os.getpid(), self.pool.target,
                 self.pool.plan.mode, self.pool.plan.threads, self.settings.queue.name)
        self.pool.manage_workers()
        while self.exit_code is None:
            self.sleep()
            self.handle_signals()
            self.handle_decisions()
            self.worker_stopped_receiving(self.pool.read_channels())
            self.worker_stopped_receiving(self.pool.reap_workers())
            self.pool.sweep_strays()
            if self.pool.exit_code is not None:  # workers cannot start with this configuration
                self.exit_code = self.pool.exit_code
            if self.exit_code is not None:
                break
            self.check_watcher()
            self.pool.check_liveness()
            self.check_retirement()
            self.pool.manage_workers()
            self.check_drain()
            self.notify_systemd()
        self.finish()
        return self.exit_code

    def sleep(self) -> None:
        fds = [self.wake_pipe.read_fd, *self.pool.channel_fds()]
        timeout = 0.05 if self.drain_state else 0.5
        if self._watchdog_s:  # wake in time for the next ping, however short WatchdogSec= is
            timeout = max(0.0, min(timeout, self._next_watchdog - time.time()))
        try:
            select.select(fds, [], [], timeout)
        except (InterruptedError, ValueError):
            pass
        self.wake_pipe.empty()

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
                self.pool.reload()
            elif signum == signal.SIGTTIN:
                self.pool.scale(self.pool.target + 1)
            elif signum == signal.SIGTTOU:
                self.pool.scale(self.pool.target - 1)

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
        """Every worker: stop receiving, give back unstarted messages, finish by the deadline.

        A drain already under way takes the new reason's deadline if it is earlier, and its notice or stop too.
        """
        state = self.drain_state
        if state is None:
            now = time.time()
            state = self.drain_state = DrainInProgress(reason, deadline, now, stop_requested=stop,
                                                       waiting_for=set(self.pool.workers))
            log.info("drain (%s): %d worker(s), deadline in %.1fs", reason, len(self.pool.workers), deadline - now)
            # STOPPING=1 only for a stop: systemd takes it as "deactivating" and kills the service once
            # TimeoutStopSec has passed, which would end a hold after an eviction or a resume (and count a failure).
            if stop:
                sdnotify.stopping(f"draining: {reason}")
            else:
                sdnotify.status(f"draining: {reason}")
            self.pool.retire_all(deadline)
        else:
            if stop and not state.stop_requested:
                sdnotify.stopping(f"draining: {reason}")
            state.stop_requested |= stop
            if deadline < state.deadline:
                log.info("drain: %s moves the deadline %.1fs earlier", reason, state.deadline - deadline)
                state.deadline = deadline
                self.pool.retire_all(deadline)
        if notice is not None:
            state.add_notice(notice)

    def on_eviction_notice(self, notice: EvictionNotice) -> None:
        """The eviction policy already logged the notice and whether (and why not) it will be acknowledged."""
        event = notice.event
        self.metrics.record_eviction_notice(event.event_type)
        self.drain_workers(f"{event.event_type} {event.event_id}", notice.deadline, notice)

    def on_notice_withdrawn(self, withdrawn: NoticeWithdrawn) -> None:
        state = self.drain_state
        if state is None or not state.withdraw(withdrawn.event_id):
            return
        if state.stop_requested:
            log.info("event %s was cancelled, but a stop was requested: draining on", withdrawn.event_id)
        elif state.notices:
            log.info("event %s was cancelled (%s); still draining for %s", withdrawn.event_id, withdrawn.reason,
                     ", ".join(state.notices))
        else:
            log.warning("event %s was cancelled (%s): resuming processing", withdrawn.event_id, withdrawn.reason)
            self.resume()

    def resume(self) -> None:
        self.drain_state = None
        self.pool.resume()
        sdnotify.ready("processing resumed")

    def worker_stopped_receiving(self, reports: list[StoppedReceiving]) -> None:
        """Worker reports (at set) and exits (at None); logs once when the last one is in."""
        state = self.drain_state
        if state is None:
            return
        for pid, at in reports:
            if state.worker_stopped_receiving(pid, at) and state.stopped_receiving_at is not None:
                log.info("drain: every worker stopped receiving %.3fs after the drain began",
                         max(0.0, state.stopped_receiving_at - state.started_at))

    def check_retirement(self) -> None:
        """An idle VM asks the fleet keeper to delete it and holds without workers (the pool drains, as for
        a drain); still here after the hold, it resumes. A drain for an eviction or a stop takes over."""
        if self.retirement is None:
            return
        draining = self.drain_state is not None

        def stop_workers() -> None:
            self.pool.retire_all(time.time() + self.settings.shutdown.drain_timeout_s)
            sdnotify.status(self.status_line())

        if self.retirement.tick(self.pool.workers.values(), draining, stop_workers):
            if not draining:
                self.pool.resume()
            sdnotify.status(self.status_line())

    def check_drain(self) -> None:
        state = self.drain_state
        if state is None:
            return
        now = time.time()
        if not self.pool.workers:
            self.after_drain(state, now)
            return
        if now >= state.deadline and state.phase is DrainPhase.DRAINING:
            state.phase = DrainPhase.ABANDONED
            log.warning("drain deadline reached: %d worker(s) still busy, releasing their messages", len(self.pool.workers))
            self.pool.abandon_all()
        kill_grace_s = self.settings.shutdown.kill_grace_s
        if now >= state.deadline + kill_grace_s and state.phase is DrainPhase.ABANDONED:
            state.phase = DrainPhase.KILLED
            for pid in self.pool.kill_all():
                log.error("worker %d did not exit %.1fs after the deadline: killing it", pid, kill_grace_s)

    def after_drain(self, state: DrainInProgress, now: float) -> None:
        """No worker left: acknowledge what we may (never waiting here), then exit, resume or hold."""
        if state.drained_at is None:
            state.drained_at = now
            self.metrics.record_drain(now - state.started_at, state.reason)
            log.info("drained in %.3fs (%s)", now - state.started_at, state.reason)
        if self.events is not None:
            for event_id in state.acks_due(now):
                state.acks[event_id].sent()
                self.events.acknowledge(event_id)
        if state.phase is not DrainPhase.HOLDING and state.waiting_for_acks():
            return
        outcome = state.outcome()
        if state.phase is DrainPhase.HOLDING and outcome is Outcome.HOLD:
            return
        if state.phase is not DrainPhase.HOLDING:
            log.info("drain timeline %s", state.timeline())
        if outcome is Outcome.RESUME:
            final = state.final_notice()
            log.info("%s: resuming processing", f"{final.event.event_type} {final.event_id}" if final else "no event left")
            self.resume()
        elif outcome is Outcome.HOLD:
            state.phase = DrainPhase.HOLDING
            status = state.holding_status()
            final = state.final_notice()
            assert final is not None
            log.info("drained; holding until %s disappears (then resuming) or the VM goes: %s", final.event_id, status)
            sdnotify.status(status)
        else:
            self.exit_code = state.exit_code

    def on_acknowledged(self, result: Acknowledged) -> None:
        state = self.drain_state
        ack = state.acks.get(result.event_id) if state is not None else None
        if state is None or ack is None:
            return
        now = time.time()
        if result.error is not None:
            ack.failed(now)
            log.warning("acknowledging %s failed (attempt %d, next in %.1fs): %s", result.event_id, ack.attempts,
                        ack.next_at - now, result.error)
            return
        ack.succeeded(now)
        log.info("acknowledged %s %.3fs after the last worker exited", result.event_id, now - (state.drained_at or now))
        if state.phase is DrainPhase.HOLDING:
            sdnotify.status(state.holding_status())

    def check_watcher(self) -> None:
        """The Scheduled Events thread must never be gone unnoticed: without it evictions come unannounced."""
        if self.events is None or self.events.is_alive() or self.events.stopping or self.exit_code is not None:
            return
        if self.drain_state is not None and self.drain_state.exit_code == 1:
            return
        log.critical("the Scheduled Events watcher thread is gone: stopping the service (exit 1) so systemd restarts it")
        self.drain_workers("Scheduled Events watcher died", time.time() + self.settings.shutdown.drain_timeout_s, stop=True)
        assert self.drain_state is not None
        self.drain_state.exit_code = 1

    # --- systemd and the end

    def notify_systemd(self) -> None:
        now = time.time()
        if not self.notified_ready and self.pool.all_ready():
            self.notified_ready = True
            sdnotify.ready(self.status_line())
            log.info("ready: %d worker(s) running", len(self.pool.workers))
        if now >= self._next_status:
            self._next_status = now + 5.0
            sdnotify.status(self.status_line())
        if self._watchdog_s and now >= self._next_watchdog:
            self._next_watchdog = now + self._watchdog_s / 2
            sdnotify.watchdog()

    def status_line(self) -> str:
        t = self.pool.totals()
        drain = self.drain_state
        if drain is not None and drain.phase is DrainPhase.HOLDING:
            return drain.holding_status()
        if drain is None and self.retirement is not None and self.retirement.holding:
            return self.retirement.status()
        state = "running" if drain is None else f"{drain.phase.value} ({drain.reason})"
        return (f"{state}: {len(self.pool.workers)} worker(s), {self.pool.in_flight()} in flight, {t.get('succeeded', 0)} done, "
                f"{t.get('failed', 0)} failed, {t.get('poisoned', 0)} poisoned, {t.get('released', 0) + t.get('interrupted', 0)} released")

    def finish(self) -> None:
        self.pool.close(give_back_wait_s=GIVE_BACK_AT_EXIT_S)
        extra = f"; {self.exit_summary(self.pool.totals())}" if self.exit_summary is not None else ""
        log.info("supervisor exiting (%d): %s%s", self.exit_code, self.status_line(), extra)
