"""The supervisor's worker processes: spawn, read, reap, respawn with backoff, scale, reload by generation.

Owned by the Arbiter, which runs the loop, signals and the drain and tells the pool what to do with its
workers through verbs (retire_all, abandon_all, kill_all, resume); the pool reports back what the drain
waits for (which workers stopped receiving, which exited) as return values, never by calling back.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psutil

from supervisor.config import SupervisorSettings
from supervisor.pool import strays
from supervisor.pool.child import ChildSetup, run_child
from supervisor.pool.lease_guard import LeaseGuard
from supervisor.pool.metrics import SupervisorMetrics
from supervisor.vm.sizing import Plan
from worker.common.backoff import exponential_delay
from worker.control import Channel, Kind
from worker.telemetry.providers import MESSAGE_OUTCOMES, Telemetry

log = logging.getLogger(__name__)

STABLE_AFTER_S = 30.0  # a worker that lived this long resets its slot's crash backoff
BUSY_CPU_SHARE = 0.5  # a silent worker that used at least this share of one CPU meanwhile is busy, not hung


@dataclass
class WorkerHandle:
    pid: int
    slot: int
    generation: int
    channel: Channel
    started_at: float
    ready: bool = False
    retiring: bool = False  # draining: not respawned when it exits
    stats: dict[str, Any] = field(default_factory=dict)
    last_heard: float = 0.0  # time.time() of its last message: stats come every second, a heartbeat
    cpu_at_heard: float = 0.0  # its CPU seconds then: silent but computing is busy (a handler holding the GIL), not hung
    busy_warned: bool = False
    unresponsive: bool = False  # killed for silence


class StoppedReceiving(NamedTuple):
    """A worker reported it stopped receiving (at: epoch s), or exited (at None)."""

    pid: int
    at: float | None


@dataclass
class ExitedTotals:
    """Counts from workers that have exited, for the summary."""

    totals: dict[str, int] = field(default_factory=dict)

    def add(self, stats: dict[str, Any]) -> None:
        for key, value in stats.items():
            if isinstance(value, int) and not isinstance(value, bool) and key not in ("pid", "running", "held", "threads"):
                self.totals[key] = self.totals.get(key, 0) + value


class WorkerPool:
    def __init__(self, settings: SupervisorSettings, plan: Plan, telemetry: Telemetry, attributes: dict[str, str],
                 metrics: SupervisorMetrics, reload: Callable[[], tuple[SupervisorSettings, Plan]] | None = None,
                 close_in_child: Sequence[int] = ()) -> None:
        self.settings = settings
        self.plan = plan
        self.telemetry = telemetry
        self.metrics = metrics
        self.attributes = attributes
        self.reload_settings = reload
        self.close_in_child = list(close_in_child)  # the owner's own descriptors (its wake-up pipe)
        self.target = plan.workers
        self.generation = 0
        # The configuration before a SIGHUP, kept until a worker of the new one is ready: if the
        # new one cannot start workers (exit 78, e.g. a handler typo), go back to it instead of exiting.
        self.previous: tuple[SupervisorSettings, Plan] | None = None
        self.workers: dict[int, WorkerHandle] = {}
        self.slot_crashes: dict[int, int] = {}
        self.respawn_at: dict[int, float] = {}
        self.draining = False  # retire_all until resume: no respawns, no scaling, no reload
        self.exit_code: int | None = None  # set when workers cannot start: the service must stop
        self.exited_totals = ExitedTotals()
        self.lease_guard = LeaseGuard()
        self.reload_pending = False  # a SIGHUP came while a generation was starting: reload once it is ready

    def start(self) -> None:
        self.lease_guard.start()
        strays.become_subreaper()

    # --- verbs for the drain

    def retire_all(self, deadline: float) -> None:
        """Every worker: stop receiving, give back unstarted messages, finish by the deadline; none respawned.
        Again with an earlier deadline moves it."""
        self.draining = True
        for handle in self.workers.values():
            self.retire(handle, deadline)

    def abandon_all(self) -> None:
        """The deadline passed: every worker gives back everything it holds and exits."""
        for handle in self.workers.values():
            handle.channel.send(Kind.ABANDON)

    def kill_all(self) -> list[int]:
        """SIGKILL every worker left; returns their pids (reap_workers reaps them)."""
        pids = list(self.workers)
        for pid in pids:
            self.kill_worker(pid, signal.SIGKILL)
        return pids

    def resume(self) -> None:
        """After a drain that ends in processing again: workers are spawned anew."""
        self.draining = False
        self.forget_crashes()

    def close(self, give_back_wait_s: float) -> None:
        """The end: kill every worker and what they left behind, let give-backs under way finish (bounded)."""
        self.kill_all()
        deadline = time.time() + 1.0
        while self.workers and time.time() < deadline:  # their strays reach us only once they are gone
            time.sleep(0.02)
            self.reap_workers()
        strays.sweep(self.workers)
        self.lease_guard.stop(wait_s=give_back_wait_s)

    # --- the processes

    def forget_crashes(self) -> None:
        """Every slot is spawned again at once, as if it never crashed."""
        self.respawn_at.clear()
        self.slot_crashes.clear()

    def manage_workers(self) -> None:
        if self.draining:
            return
        if self.reload_pending and not self.generation_starting():
            self.reload()
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
        inherited = self.channel_fds()
        inherited += [parent_end.fileno(), *self.close_in_child]
        supervisor_pid = os.getpid()  # not os.getppid() in the child: by then the supervisor may already be gone
        gpu = self.plan.gpu_for_slot(slot)  # by slot: a respawned worker gets its slot's GPU back
        leases = self.lease_guard.new_table(self.plan.threads, self.settings.queue)
        pid = os.fork()
        if pid == 0:
            run_child(ChildSetup(self.settings, slot, self.plan.threads, child_end, supervisor_pid, inherited,
                                 self.attributes, gpu, leases))
        child_end.close()
        self.lease_guard.watch(pid, leases, self.settings.queue)
        now = time.time()
        self.workers[pid] = WorkerHandle(pid, slot, self.generation, Channel(parent_end), now, last_heard=now)
        self.respawn_at.pop(slot, None)
        log.info("spawned worker %d (slot %d, %s%d thread(s))", pid, slot, f"{gpu.describe()}, " if gpu else "", self.plan.threads)

    def read_channels(self) -> list[StoppedReceiving]:
        reports: list[StoppedReceiving] = []
        for handle in list(self.workers.values()):
            for message in handle.channel.receive():
                self.on_worker_message(handle, message, reports)
        return reports

    def on_worker_message(self, handle: WorkerHandle, message: dict[str, Any], reports: list[StoppedReceiving]) -> None:
        kind = message["kind"]
        handle.last_heard = time.time()
        handle.cpu_at_heard = cpu_seconds(handle.pid)
        handle.busy_warned = False
        if kind == Kind.READY:
            handle.ready = True
            if handle.generation == self.generation:
                self.previous = None
                self.retire_older_generations()
        elif kind in (Kind.STATS, Kind.EXITING):
            handle.stats = message
        elif kind == Kind.STOPPED_RECEIVING:
            reports.append(StoppedReceiving(handle.pid, float(message.get("at") or time.time())))
        elif kind == Kind.FATAL:
            log.error("worker %d cannot start: %s", handle.pid, message.get("error"))
            if message.get("code") == os.EX_CONFIG:
                self.config_failed(handle, str(message.get("error")))

    def reap_workers(self) -> list[StoppedReceiving]:
        """Reaps every child that exited (strays included); for each worker, its last reports and its exit."""
        reports: list[StoppedReceiving] = []
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reports
            if pid == 0:
                return reports
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            for message in handle.channel.receive():  # its last words, e.g. the drained counts
                self.on_worker_message(handle, message, reports)
            handle.channel.close()
            # What it still held (killed at the deadline, or crashed) goes back now, off this loop; cut short by a
            # drain, as a release. What it started is killed first, so nothing still works on a message given back.
            strays.sweep(self.workers)
            self.lease_guard.worker_exited(pid, cut_short=handle.retiring or self.draining)
            reports.append(StoppedReceiving(pid, None))
            self.exited_totals.add(handle.stats)
            self.on_worker_exit(handle, status)

    def sweep_strays(self) -> None:
        strays.sweep(self.workers)

    def on_worker_exit(self, handle: WorkerHandle, status: int) -> None:
        code = os.waitstatus_to_exitcode(status)
        described = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
        if handle.unresponsive:
            described += ", killed for not answering"
        if code == os.EX_CONFIG:
            if handle.generation == self.generation and self.exit_code is None:
                log.error("worker %d exited with 78 (configuration)", handle.pid)
            self.config_failed(handle, "exit code 78")
            return
        if handle.retiring or self.draining or handle.generation != self.generation:
            log.info("worker %d exited (%s)", handle.pid, described)
            return
        lived = time.time() - handle.started_at
        crashes = 0 if lived >= STABLE_AFTER_S else self.slot_crashes.get(handle.slot, 0) + 1
        self.slot_crashes[handle.slot] = crashes
        delay = 0.0 if crashes <= 1 else exponential_delay(crashes - 2, 0.5, self.settings.scaling.respawn_delay_max_s)
        self.respawn_at[handle.slot] = time.time() + delay
        self.metrics.record_worker_respawn(described)
        log.warning("worker %d died (%s) after %.1fs; respawning slot %d in %.1fs", handle.pid, described, lived, handle.slot, delay)

    def check_liveness(self) -> None:
        """A ready worker that sends nothing and uses no CPU (stopped, deadlocked) is killed, then replaced
        like any crashed one; what it held reappears after its lease. One that is silent but computing (a
        handler holding the GIL) is busy, not hung: it is left alone, the lease guard renews its leases."""
        timeout = self.settings.scaling.worker_timeout_s
        # A draining worker's loop gives its messages back, one queue call at a time, which may take long while
        # the queue fails: it gets its drain time on top.
        draining_timeout = timeout + self.settings.shutdown.drain_timeout_s + self.settings.shutdown.kill_grace_s
        now = time.time()
        for handle in self.workers.values():
            silent = now - handle.last_heard
            if handle.ready and not handle.unresponsive and silent > (draining_timeout if handle.retiring else timeout):
                if cpu_seconds(handle.pid) - handle.cpu_at_heard >= BUSY_CPU_SHARE * silent:
                    if not handle.busy_warned:
                        handle.busy_warned = True
                        log.warning("worker %d sent nothing for %.1fs but is computing (a handler holding the GIL?): "
                                    "left running, its leases renewed by the supervisor", handle.pid, silent)
                    continue
                handle.unresponsive = True
                log.error("worker %d sent nothing for %.1fs (scaling.worker_timeout_s %.0f): killing it",
                          handle.pid, silent, timeout)
                self.kill_worker(handle.pid, signal.SIGKILL)

    def scale(self, target: int) -> None:
        if self.draining:
            return
        target = max(1, min(target, self.settings.scaling.max_workers))
        if target == self.target:
            log.info("scaling: staying at %d worker(s) (at least 1, at most scaling.max_workers %d)",
                     target, self.settings.scaling.max_workers)
            return
        log.info("scaling workers %d -> %d", self.target, target)
        self.target = target
        for handle in list(self.workers.values()):
            if handle.slot >= target and not handle.retiring:
                self.retire(handle, time.time() + self.settings.shutdown.drain_timeout_s)

    def retire(self, handle: WorkerHandle, deadline: float) -> None:
        """Drain one worker by the deadline (not respawned); again with an earlier one moves it."""
        handle.retiring = True
        handle.channel.send(Kind.DRAIN, deadline=deadline)

    def generation_starting(self) -> bool:
        """A reload's workers are not all ready yet (the ones before them still run, not yet retired)."""
        return any(w.generation < self.generation and not w.retiring for w in self.workers.values())

    def reload(self) -> None:
        if self.reload_settings is None or self.draining:
            return
        if self.generation_starting():
            # Coalesced: at most one generation starts at a time, however many SIGHUPs arrive meanwhile.
            if not self.reload_pending:
                log.info("SIGHUP: the last reload's workers are still starting; reloading again once they are ready")
            self.reload_pending = True
            return
        self.reload_pending = False
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
        self.forget_crashes()

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
            self.fail(os.EX_CONFIG)
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
        self.forget_crashes()

    def kill_worker(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError as exc:
            if exc.errno != errno.ESRCH:
                raise

    def all_ready(self) -> bool:
        return bool(self.workers) and all(w.ready for w in self.workers.values())

    def in_flight(self) -> int:
        return sum(int(w.stats.get("running", 0)) for w in self.workers.values())

    def channel_fds(self) -> list[int]:
        return [w.channel.fileno() for w in self.workers.values() if not w.channel.closed]

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

    def totals(self) -> dict[str, int]:
        totals = dict(self.exited_totals.totals)
        for handle in list(self.workers.values()):  # a copy: the metrics thread reads the totals too
            for key in MESSAGE_OUTCOMES:
                totals[key] = totals.get(key, 0) + int(handle.stats.get(key, 0))
        return totals


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (0.0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(times.user + times.system)
