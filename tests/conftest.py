"""Fixtures: one real Azurite (queue service, in memory) per test run, a fresh queue per test,
`supervisors`, which starts `spot-supervisor` processes and kills their process groups afterwards,
`simulator` and `start_evictable` (a supervisor whose Scheduled Events come from the IMDS simulator),
and in-process workers (`runtimes`, `telemetry`, `record_path`).

Helpers live in testsupport/ (importable thanks to pytest's `pythonpath = ["."]`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from azure.storage.queue import QueueClient

from supervisor.simulator.server import ImdsSimulator
from testsupport.azurite import Azurite, running_azurite
from testsupport.handlers import RECORD_ENV
from testsupport.harness import SAMPLE_RESULTS, Supervisor, child_env
from worker.runtime import WorkerRuntime
from worker.settings import Settings, TelemetrySettings
from worker.telemetry.providers import Telemetry, setup_telemetry


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with running_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def queue(azurite: Azurite, queue_name: str) -> QueueClient:
    client = azurite.queue(queue_name)
    client.create_queue()
    return client


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """start(env, *args, preexec_fn=None) -> Supervisor (args default to "run"); all are killed at teardown."""
    started: list[Supervisor] = []

    def start(env: dict[str, str], *args: str, preexec_fn: Callable[[], None] | None = None) -> Supervisor:
        sup = Supervisor(env, tmp_path, *args, preexec_fn=preexec_fn)
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            try:  # what its programs started, should any of it outlive the supervisor
                tree = psutil.Process(sup.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            sup.cleanup()
            for process in tree:
                try:
                    process.kill()
                except psutil.Error:
                    pass


@pytest.fixture
def simulator() -> Iterator[ImdsSimulator]:
    sim = ImdsSimulator(vm_name="vm-spot-07").start()
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture
def start_evictable(azurite: Azurite, queue_name: str, simulator: ImdsSimulator, tmp_path: Path,
                    supervisors: Callable[..., Supervisor]) -> Callable[..., Supervisor]:
    """start(events=True, extra_env=None, **spot) -> a supervisor with 2 workers on the test's queue, polling the
    simulator every 0.25 s (events=False: no events source); the sample handler writes to tmp_path/SAMPLE_RESULTS
    and the record handler to tmp_path/records.jsonl."""
    def start(events: bool = True, extra_env: dict[str, str] | None = None, **spot: str) -> Supervisor:
        settings = {"queue_name": queue_name, "queue_visibility_timeout_s": "10", "queue_batch_size": "8",
                    "scaling_workers": "2", "shutdown_drain_timeout_s": "20"}
        if events:
            settings.update(events_source="azure", events_endpoint=simulator.url, events_poll_interval_s="0.25",
                            events_request_timeout_s="0.5")
        settings.update(spot)
        env = child_env(azurite, **settings)
        env["SPOT_SAMPLE_RESULTS"] = str(tmp_path / SAMPLE_RESULTS)
        env[RECORD_ENV] = str(tmp_path / "records.jsonl")
        env.update(extra_env or {})
        return supervisors(env)

    return start


@pytest.fixture(scope="session")
def telemetry() -> Telemetry:
    """In-process workers' telemetry: no exporter, one per test run."""
    return setup_telemetry(TelemetrySettings(), "worker")


@pytest.fixture
def record_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where testsupport.handlers:record appends its events for in-process workers."""
    path = tmp_path / "attempts.jsonl"
    monkeypatch.setenv(RECORD_ENV, str(path))
    return path


@pytest.fixture
def runtimes(telemetry: Telemetry) -> Iterator[Callable[..., WorkerRuntime]]:
    """start(settings, threads=1) -> a started in-process WorkerRuntime; each is drained (abandoned after 5 s) and closed."""
    started: list[WorkerRuntime] = []

    def start(settings: Settings, threads: int = 1) -> WorkerRuntime:
        runtime = WorkerRuntime(settings, telemetry, threads)
        runtime.start()
        started.append(runtime)
        return runtime

    yield start
    for runtime in started:
        runtime.stop_receiving(time.time() + 5)
        deadline = time.monotonic() + 5
        while not runtime.idle() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not runtime.idle():
            runtime.abandon()
        runtime.close()
