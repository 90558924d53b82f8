"""A Scheduled Events watcher thread that dies must stop the service (exit 1), never go unnoticed (issue 16, defect 8).

In-process: a real Arbiter (no workers) and a real EventWatcher thread that dies; the end-to-end way to kill
the thread (an overflowing poll interval) is refused at configuration time now.
"""

from __future__ import annotations

import pytest

from supervisor.config import EventsSettings, SupervisorSettings
from supervisor.events.azure import EventsDocument
from supervisor.events.watcher import EventWatcher
from supervisor.pool.arbiter import Arbiter
from supervisor.pool.drain import DrainPhase
from supervisor.vm.sizing import Plan
from worker.settings import TelemetrySettings
from worker.telemetry.providers import setup_telemetry


class FatalSource:
    """An event source whose poll raises what the watcher does not catch (as a bug in it would)."""

    def poll(self) -> EventsDocument:
        raise SystemExit("the watcher's own bug")

    def acknowledge(self, event_id: str) -> None:
        raise AssertionError("nothing to acknowledge")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_watcher_thread_stops_the_service_with_exit_1() -> None:
    watcher = EventWatcher(FatalSource(), EventsSettings(poll_interval_s=0.05), "vm-spot-07")
    plan = Plan("scale-out", 1, 1, 1, 1024, None)
    telemetry = setup_telemetry(TelemetrySettings(), "supervisor", {})
    arbiter = Arbiter(SupervisorSettings(), plan, telemetry, {}, events=watcher)
    try:
        watcher.watch(arbiter.submit)
        watcher.join(5)
        assert not watcher.is_alive()

        arbiter.check_watcher()
        state = arbiter.drain_state
        assert state is not None and state.stop_requested and state.phase is DrainPhase.DRAINING
        arbiter.check_watcher()  # noticed once
        arbiter.check_drain()  # no workers: drained at once
        assert arbiter.exit_code == 1
    finally:
        telemetry.shutdown()


def test_a_watcher_stopped_on_purpose_is_not_a_failure() -> None:
    watcher = EventWatcher(FatalSource(), EventsSettings(poll_interval_s=0.05), "")  # waits for the VM name
    plan = Plan("scale-out", 1, 1, 1, 1024, None)
    telemetry = setup_telemetry(TelemetrySettings(), "supervisor", {})
    arbiter = Arbiter(SupervisorSettings(), plan, telemetry, {}, events=watcher)
    try:
        watcher.watch(arbiter.submit)
        watcher.stop()
        arbiter.check_watcher()
        assert arbiter.drain_state is None and arbiter.exit_code is None
    finally:
        telemetry.shutdown()
