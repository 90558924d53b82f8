"""The supervisor's main loop, in the manner of gunicorn's arbiter.

Signal handlers and the Scheduled Events thread only record what happened and
wake the loop; the loop alone spawns, reaps, drains, acknowledges and exits.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import select
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from supervisor import sdnotify, strays
from supervisor.child import run_child
from supervisor.eviction import Decision, Drain, Resume
from supervisor.sizing import Plan
from worker.control import Channel
from worker.process import EX_CONFIG
from worker.settings import Settings
from worker.telemetry import Telemetry

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD)
STABLE_AFTER_S = 30.0  # a worker that lived this long resets its slot's crash backoff


@dataclass
class WorkerHandle:
    pid: int
    slot: int
    generation: int
    channel: Channel
    started_at: float
    ready: bool = False
    retiring: bool = False  # draining: not respawned when it exits
    stopped_receiving_at: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class DrainInProgress:
    reason: str
    deadline: float
    started_at: float
    event: Drain | None = None
    abandon_sent: bool = False
    waiting_for: set[int] = field(default_factory=set)  # pids not yet reported "stopped receiving"
    last_stopped_at: float = 0.0
    holding: bool = False  # drained, event not acknowledged: wait for it to start or be cancelled
    stop_requested: bool = False  # a signal asked for a stop: never resume, never hold
    killed: bool = False


@dataclass
class Settled:
    """Counts from workers that have exited, for the summary."""

    totals: dict[str, int] = field(default_factory=dict)

    def add(self, stats: dict[str, Any]) -> None:
        for key, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool) and key not in ("pid", "running", "held", "threads"):
                self.totals[key] = self.totals.get(key, 0) + value


class Arbiter:
    def __init__(self, settings: Settings, plan: Plan, telemetry: Telemetry, attributes: dict[str, str],
                 reload: Callable[[], tuple[Settings, Plan]] | None = None,
                 acknowledge: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.plan = plan
        self.telemetry = telemetry
        self.attributes = attributes
        self.reload_settings = reload
        self.acknowledge_event = acknowledge
        self.target = plan.workers
        self.generation = 0
        # The configuration before a SIGHUP, kept until a worker of the new one is ready: if the
        # new one cannot start workers (exit 78, e.g. a handler typo), go back to it instead of exiting.
        self.previous: tuple[Settings, Plan] | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.slot_crashes: dict[int, int] = {}
        self.respawn_at: dict[int, float] = {}
        self.signals: list[int] = []
        self.decisions: queue.SimpleQueue[Decision] = queue.SimpleQueue()
        self.drain_state: DrainInProgress | None = None
        self.exit_code: int | None = None
        self.settled = Settled()
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
        """Called from the Scheduled Events thread."""
        self.decisions.put(decision)
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except BlockingIOError:
            pass

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._record_signal)

    # --- the loop

    def run(self) -> int:
        self.install_signals()
        strays.become_subreaper()
        log.info("supervisor %d starting %d %s worker(s) x %d thread(s) for queue %s",
                 os.getpid(), self.target, self.plan.mode, self.plan.threads, self.settings.queue.name)
        self.manage_workers()
        while self.exit_code is None:
            self.sleep()
            self.handle_signals()
            self.handle_decisions()
            self.read_channels()
            self.reap_workers()
            strays.sweep(self.workers)
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
            if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT) and self.drain_state and self.drain_state.holding:
                log.info("%s while holding after a drain: exiting", name)
                self.exit_code = 0
            elif signum in (signal.SIGTERM, signal.SIGINT):
                self.drain(f"{name}", time.time() + self.settings.shutdown.drain_timeout_s, stop=True)
            elif signum == signal.SIGQUIT:
                self.drain(f"{name} (fast stop)", time.time(), stop=True)
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
            if isinstance(decision, Drain):
                self.on_eviction_notice(decision)
            elif isinstance(decision, Resume):
                self.on_event_cancelled(decision)

    # --- workers

    def manage_workers(self) -> None:
        if self.drain_state is not None:
            return
        now = time.time()
        active_slots = {w.slot for w in self.workers.values() if not w.retiring and w.generation == self.generation}
        for slot in range(self.target):
            if slot in active_slots:
                continue
            if self.respawn_at.get(slot, 0.0) > now:
                continue
            self.spawn_worker(slot)

    def spawn_worker(self, slot: int) -> None:
        parent_end, child_end = socket.socketpair()
        inherited = [w.channel.fileno() for w in self.workers.values() if not w.channel.closed]
        inherited += [parent_end.fileno(), self._wake_r, self._wake_w]
        supervisor_pid = os.getpid()  # not os.getppid() in the child: by then the supervisor may already be gone
        pid = os.fork()
        if pid == 0:
            run_child(self.settings, slot, self.plan.threads, child_end, supervisor_pid, inherited, self.attributes)
        child_end.close()
        self.workers[pid] = WorkerHandle(pid, slot, self.generation, Channel(parent_end), time.time())
        self.respawn_at.pop(slot, None)
        log.info("spawned worker %d (slot %d, %d thread(s))", pid, slot, self.plan.threads)

    def read_channels(self) -> None:
        for handle in list(self.workers.values()):
            for message in handle.channel.receive():
                self.on_worker_message(handle, message)

    def on_worker_message(self, handle: WorkerHandle, message: dict[str, Any]) -> None:
        kind = message["kind"]
        if kind == "ready":
            handle.ready = True
            if handle.generation == self.generation:
                self.previous = None
                self.retire_older_generations()
        elif kind == "stats":
            handle.stats = message
        elif kind == "draining":
            handle.stopped_receiving_at = message.get("at") or time.time()
            self.worker_stopped_receiving(handle.pid, handle.stopped_receiving_at)
        elif kind == "drained":
            handle.stats = message
        elif kind == "fatal":
            log.error("worker %d cannot start: %s", handle.pid, message.get("error"))
            if message.get("code") == EX_CONFIG:
                self.config_failed(handle, str(message.get("error")))

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            for message in handle.channel.receive():  # its last words, e.g. the drained counts
                self.on_worker_message(handle, message)
            handle.channel.close()
            self.worker_stopped_receiving(pid, None)
            self.settled.add(handle.stats)
            self.on_worker_exit(handle, status)

    def on_worker_exit(self, handle: WorkerHandle, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        described = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if code == EX_CONFIG:
            if handle.generation == self.generation and self.exit_code is None:
                log.error("worker %d exited with 78 (configuration)", handle.pid)
            self.config_failed(handle, "exit code 78")
            return
        if handle.retiring or self.drain_state is not None or handle.generation != self.generation:
            log.info("worker %d exited (%s)", handle.pid, described)
            return
        lived = time.time() - handle.started_at
        crashes = 0 if lived >= STABLE_AFTER_S else self.slot_crashes.get(handle.slot, 0) + 1
        self.slot_crashes[handle.slot] = crashes
        delay = 0.0 if crashes <= 1 else min(self.settings.scaling.respawn_delay_max_s, 0.5 * 2 ** (crashes - 2))
        self.respawn_at[handle.slot] = time.time() + delay
        self.telemetry.record_worker_respawn(described)
        log.warning("worker %d died (%s) after %.1fs; respawning slot %d in %.1fs", handle.pid, described, lived, handle.slot, delay)

    def scale(self, target: int) -> None:
        if self.drain_state is not None:
            return
        target = max(1, target)
        log.info("scaling workers %d -> %d", self.target, target)
        self.target = target
        for handle in list(self.workers.values()):
            if handle.slot >= target and not handle.retiring:
                self.retire(handle, time.time() + self.settings.shutdown.drain_timeout_s)

    def retire(self, handle: WorkerHandle, deadline: float) -> None:
        handle.retiring = True
        handle.channel.send("drain", deadline=deadline)

    def reload(self) -> None:
        if self.reload_settings is None or self.drain_state is not None:
            return
        try:
            settings, plan = self.reload_settings()
        except Exception as exc:  # a bad edit must not take the running service down
            log.error("SIGHUP: keeping the running configuration: %s", exc)
            return
        log.info("SIGHUP: reloaded configuration; starting %d new worker(s), the %d running ones drain once they are ready",
                 plan.workers, len(self.workers))
        if self.previous is None:  # two quick SIGHUPs: keep the last configuration known to start workers
            self.previous = (self.settings, self.plan)
        self.settings, self.plan, self.target = settings, plan, plan.workers
        self.generation += 1
        self.respawn_at.clear()
        self.slot_crashes.clear()

    def retire_older_generations(self) -> None:
        """Once every worker of the current configuration is ready, the ones before it drain (as in gunicorn:
        new workers first, so a reload never leaves the queue unattended)."""
        current = [w for w in self.workers.values() if w.generation == self.generation and not w.retiring]
        if len(current) < self.target or not all(w.ready for w in current):
            return
        deadline = time.time() + self.settings.shutdown.drain_timeout_s
        for handle in list(self.workers.values()):
            if handle.generation < self.generation and not handle.retiring:
                self.retire(handle, deadline)

    def config_failed(self, handle: WorkerHandle, why: str) -> None:
        """A worker cannot start with the current configuration (exit 78).

        After a SIGHUP, go back to the configuration that ran before; otherwise stop the service.
        """
        if self.exit_code is not None or handle.generation != self.generation:
            return  # already stopping, or a configuration already given up
        if self.previous is None:
            log.error("stopping the service: workers cannot start with this configuration")
            self.fail(EX_CONFIG)
            return
        log.error("SIGHUP: workers cannot start with the new configuration (%s): going back to the previous one", why)
        for other in self.workers.values():
            if other.generation == self.generation and not other.retiring:
                self.retire(other, time.time())
        (self.settings, self.plan), self.previous = self.previous, None
        self.target = self.plan.workers
        self.generation += 1
        for other in self.workers.values():  # the workers of the previous configuration are current again
            if not other.retiring:
                other.generation = self.generation
        self.respawn_at.clear()
        self.slot_crashes.clear()

    # --- drain

    def drain(self, reason: str, deadline: float, event: Drain | None = None, stop: bool = False) -> None:
        """Every worker: stop receiving, release unstarted messages, finish by the deadline."""
        if self.drain_state is not None:
            self.drain_state.stop_requested |= stop
            if deadline < self.drain_state.deadline:
                self.drain_state.deadline = deadline
                for handle in self.workers.values():
                    handle.channel.send("drain", deadline=deadline)
            if event is not None and self.drain_state.event is None:
                self.drain_state.event = event
            return
        now = time.time()
        self.drain_state = DrainInProgress(reason, deadline, now, event, waiting_for=set(self.workers), stop_requested=stop)
        log.info("drain (%s): %d worker(s), deadline in %.1fs", reason, len(self.workers), deadline - now)
        sdnotify.stopping(f"draining: {reason}")
        for handle in self.workers.values():
            handle.retiring = True
            handle.channel.send("drain", deadline=deadline)

    def on_eviction_notice(self, decision: Drain) -> None:
        event = decision.event
        self.telemetry.record_eviction_notice(event.event_type)
        log.warning("%s %s (%s) for this VM, NotBefore %s: draining", event.event_type, event.event_id,
                    event.status, event.not_before.isoformat() if event.not_before else "now")
        self.drain(f"{event.event_type} {event.event_id}", decision.deadline, decision)

    def on_event_cancelled(self, decision: Resume) -> None:
        state = self.drain_state
        if state is None or state.event is None or state.event.event_id != decision.event_id:
            return
        if state.stop_requested:
            log.info("event %s was cancelled, but a stop was requested: draining on", decision.event_id)
            state.event = None
            return
        log.warning("event %s was cancelled (%s): resuming processing", decision.event_id, decision.reason)
        self.drain_state = None
        self.respawn_at.clear()
        self.slot_crashes.clear()
        sdnotify.ready("processing resumed")

    def worker_stopped_receiving(self, pid: int, at: float | None) -> None:
        """Called per worker report (at set) or exit (at None); logs once when the last one is in."""
        state = self.drain_state
        if state is None or pid not in state.waiting_for:
            return
        state.waiting_for.discard(pid)
        if at is not None:
            state.last_stopped_at = max(state.last_stopped_at, at)
        if not state.waiting_for and state.last_stopped_at:
            log.info("drain: every worker stopped receiving %.3fs after the drain began",
                     max(0.0, state.last_stopped_at - state.started_at))

    def check_drain(self) -> None:
        state = self.drain_state
        if state is None:
            return
        now = time.time()
        if not self.workers:
            if not state.holding:
                self.drained()
            return
        if now >= state.deadline and not state.abandon_sent:
            state.abandon_sent = True
            log.warning("drain deadline reached: %d worker(s) still busy, releasing their messages", len(self.workers))
            for handle in self.workers.values():
                handle.channel.send("abandon")
        if now >= state.deadline + self.settings.shutdown.kill_grace_s and not state.killed:
            state.killed = True
            for handle in self.workers.values():
                log.error("worker %d did not exit %.1fs after the deadline: killing it", handle.pid, self.settings.shutdown.kill_grace_s)
                self.kill_worker(handle.pid, signal.SIGKILL)

    def drained(self) -> None:
        state = self.drain_state
        assert state is not None
        last_exit = time.time()
        self.telemetry.record_drain(last_exit - state.started_at, state.reason)
        log.info("drained in %.3fs (%s)", last_exit - state.started_at, state.reason)
        acknowledged = False
        if state.event is not None and state.event.acknowledge and self.acknowledge_event is not None:
            acknowledged = self.ack_event(state.event, last_exit)
        elif state.event is not None:
            log.info("not acknowledging %s: %s", state.event.event_id, why_not_acknowledged(state.event))
        if state.event is not None and state.event.event.event_type == "Freeze":
            # A freeze pauses the VM and lets it carry on: nothing will restart this service, so resume now.
            log.info("freeze %s: resuming processing", state.event.event_id)
            self.drain_state = None
            return
        if state.event is not None and not acknowledged and not state.stop_requested and state.event.event.status != "Started":
            # Not approved by us, so it may still be cancelled: stay (without workers) to resume if it is.
            state.holding = True
            log.info("drained; holding until %s starts or is cancelled", state.event.event_id)
            sdnotify.status(f"drained, holding for {state.event.event_id}")
            return
        self.exit_code = 0

    def ack_event(self, decision: Drain, last_exit: float) -> bool:
        assert self.acknowledge_event is not None
        for attempt in range(3):
            try:
                self.acknowledge_event(decision.event_id)
            except Exception as exc:  # the platform proceeds at NotBefore anyway; acking only makes it sooner
                log.warning("acknowledging %s failed (attempt %d): %s", decision.event_id, attempt + 1, exc)
                time.sleep(0.2 * (attempt + 1))
                continue
            log.info("acknowledged %s %.3fs after the last worker exited", decision.event_id, time.time() - last_exit)
            return True
        return False

    def kill_worker(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def fail(self, code: int) -> None:
        """Stop everything now (configuration error): no drain, no respawn."""
        self.exit_code = code
        for pid in list(self.workers):
            self.kill_worker(pid, signal.SIGQUIT)
        deadline = time.time() + self.settings.shutdown.kill_grace_s + 2
        while self.workers and time.time() < deadline:
            time.sleep(0.05)
            self.reap_workers()
        for pid in list(self.workers):
            self.kill_worker(pid, signal.SIGKILL)

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

    def totals(self) -> dict[str, int]:
        totals = dict(self.settled.totals)
        for handle in self.workers.values():
            for key in ("succeeded", "failed", "released", "interrupted", "poisoned", "lease_lost"):
                totals[key] = totals.get(key, 0) + int(handle.stats.get(key, 0))
        return totals

    def status_line(self) -> str:
        t = self.totals()
        running = sum(int(w.stats.get("running", 0)) for w in self.workers.values())
        state = f"draining ({self.drain_state.reason})" if self.drain_state else "running"
        return (f"{state}: {len(self.workers)} worker(s), {running} in flight, {t.get('succeeded', 0)} done, "
                f"{t.get('failed', 0)} failed, {t.get('poisoned', 0)} poisoned, {t.get('released', 0) + t.get('interrupted', 0)} released")

    def finish(self) -> None:
        for pid in list(self.workers):
            self.kill_worker(pid, signal.SIGKILL)
        deadline = time.time() + 1.0
        while self.workers and time.time() < deadline:  # their strays reach us only once they are gone
            time.sleep(0.02)
            self.reap_workers()
        strays.sweep(self.workers)
        log.info("supervisor exiting (%d): %s", self.exit_code, self.status_line())


def why_not_acknowledged(decision: Drain) -> str:
    event = decision.event
    if event.status == "Started":
        return "it has already started"
    if len(event.resources) > 1:
        return "other VMs are listed in it, and acknowledging would approve it for them too (events.ack = \"always\" to do it anyway)"
    return "events.ack is \"never\""
