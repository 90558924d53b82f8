"""A worker process's main loop: signals and control messages in, drain and exit out.

Used by the supervisor's forked children (with a control channel) and by
`python -m worker` (standalone, signals only). Signal handlers only record;
this loop acts.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from types import FrameType
from typing import Any

from worker.common.wake_pipe import WakePipe
from worker.control import Channel, Kind
from worker.queue.lease_slots import LeaseSlots
from worker.runtime import WorkerRuntime
from worker.settings import Settings
from worker.telemetry.providers import Telemetry
from worker.workload_errors import WorkloadError

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0


class WorkerProcess:
    def __init__(self, settings: Settings, telemetry: Telemetry, threads: int = 1, channel: Channel | None = None,
                 parent_pid: int | None = None, lease_slots: LeaseSlots | None = None) -> None:
        self.settings = settings
        self.lease_slots = lease_slots
        self.telemetry = telemetry
        self.threads = threads
        self.channel = channel
        self.parent_pid = parent_pid
        self.signals: list[int] = []
        self._wake = WakePipe()

    def _record_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals.append(signum)

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake.write_fd)
        for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT):
            signal.signal(sig, self._record_signal)
        if self.channel is not None:
            # Ctrl-C reaches the whole process group: the supervisor coordinates, workers wait for its word.
            # A no-op handler rather than SIG_IGN, which programs run as handlers would inherit.
            signal.signal(signal.SIGINT, _ignore_signal)

    def run(self) -> int:
        self.install_signals()
        try:
            runtime = WorkerRuntime(self.settings, self.telemetry, self.threads, self.lease_slots)
        except WorkloadError as exc:
            log.error("%s", exc)
            self._send(Kind.FATAL, code=os.EX_CONFIG, error=str(exc))
            return os.EX_CONFIG
        runtime.start()
        self._send(Kind.READY, threads=self.threads)
        try:
            code = self._loop(runtime)
        finally:
            runtime.close()
        stats = runtime.stats()
        log.info("worker exiting: %s", _format_counts(stats))
        self._send(Kind.EXITING, abandoned=runtime.abandoned, **stats)
        return code

    def _loop(self, runtime: WorkerRuntime) -> int:
        """Runs until drained (0), or until a consumer thread died (1: the supervisor respawns the process)."""
        next_stats = 0.0
        while True:
            self._wait_for_input(runtime)
            self._act_on_signals(runtime)
            self._act_on_control(runtime)
            now = time.time()
            if runtime.crashed():
                log.error("a consumer thread died: releasing held messages, exiting for a fresh process")
                runtime.abandon()
                return 1
            if runtime.deadline is not None:
                if runtime.idle():
                    return 0
                if now >= runtime.deadline:
                    runtime.abandon()
                    return 0
            if self.channel is not None and now >= next_stats:
                self._send(Kind.STATS, **runtime.stats())
                next_stats = now + STATS_INTERVAL_S

    def _wait_for_input(self, runtime: WorkerRuntime) -> None:
        readable: list[int] = [self._wake.read_fd]
        if self.channel is not None and not self.channel.closed:
            readable.append(self.channel.fileno())
        timeout = 0.05 if runtime.deadline is not None else 0.5
        try:
            select.select(readable, [], [], timeout)
        except InterruptedError:
            return
        self._wake.empty()

    def _act_on_signals(self, runtime: WorkerRuntime) -> None:
        while self.signals:
            signum = self.signals.pop(0)
            if signum == signal.SIGQUIT:
                log.info("SIGQUIT: releasing held messages and exiting")
                self.begin_drain(runtime, time.time())
            else:
                log.info("%s: draining (up to %.0fs)", signal.Signals(signum).name, self.settings.shutdown.drain_timeout_s)
                self.begin_drain(runtime, time.time() + self.settings.shutdown.drain_timeout_s)

    def _act_on_control(self, runtime: WorkerRuntime) -> None:
        if self.channel is None:
            return
        for message in self.channel.receive():
            if message["kind"] == Kind.DRAIN:
                self.begin_drain(runtime, float(message.get("deadline") or time.time()))
            elif message["kind"] == Kind.ABANDON:
                self.begin_drain(runtime, time.time())
        orphaned = self.parent_pid is not None and os.getppid() != self.parent_pid
        if self.channel.closed or orphaned:
            if runtime.deadline is None or runtime.deadline > time.time():
                log.warning("supervisor is gone: releasing held messages and exiting")
                self.begin_drain(runtime, time.time())

    def begin_drain(self, runtime: WorkerRuntime, deadline: float) -> None:
        if runtime.deadline is not None and deadline >= runtime.deadline:
            return
        if runtime.stop_receiving(deadline):
            self._send(Kind.STOPPED_RECEIVING, at=runtime.stopped_receiving_at)

    def _send(self, kind: str, **fields: Any) -> None:
        if self.channel is not None:
            self.channel.send(kind, pid=os.getpid(), **fields)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    pass


def _format_counts(stats: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in stats.items() if v) or "nothing processed"
