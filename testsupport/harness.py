"""`spot-supervisor` as a real child process, for end-to-end tests.

Each Supervisor runs in its own session, so `cleanup()` can SIGKILL the whole
process group: no worker outlives a test, whatever it asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from azure.storage.queue import QueueClient

from testsupport.azurite import REPO, Azurite
from testsupport.handlers import read_json_lines
from testsupport.queues import enqueue_sample_work
from testsupport.waiting import wait_until
from worker.settings import QueueSettings, Settings, WorkloadSettings, validate

AZURE_FIXTURES = REPO.parent / "shared" / "fixtures" / "azure"  # recorded IMDS documents
_SCRIPT = Path(sys.executable).with_name("spot-supervisor")
SUPERVISOR = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "supervisor"]
RECORD_HANDLER = "testsupport.handlers:record"
SAMPLE_RESULTS = "results.jsonl"  # in a test's directory: what worker/sample.py's handler wrote (SPOT_SAMPLE_RESULTS)
# The supervisor's line for each worker it starts on a GPU: pid, slot, GPU index, GPU UUID.
SPAWNED = re.compile(r"spawned worker (\d+) \(slot (\d+), GPU (\d+) \((\S+)\)")


def child_env(azurite: Azurite, **spot: str) -> dict[str, str]:
    """Environment for a child process (worker or supervisor) aimed at the test Azurite.

    `spot` items become SPOT_<KEY> variables (queue_name="x" -> SPOT_QUEUE_NAME=x).
    events.source is "none" and cost.enabled false unless a test says otherwise: the real IMDS
    address and the public Retail Prices API are never contacted from tests. The repo is on
    PYTHONPATH, so workers can import testsupport.handlers.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update({"SPOT_QUEUE_CONNECTION_STRING": azurite.connection_string, "SPOT_EVENTS_SOURCE": "none",
                "SPOT_COST_ENABLED": "false", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)})
    env.update({f"SPOT_{k.upper()}": v for k, v in spot.items()})
    return env


def sample_results(workdir: Path) -> list[dict[str, Any]]:
    return read_json_lines(workdir / SAMPLE_RESULTS)


def processes_sample_work(sup: Supervisor, queue: QueueClient, workdir: Path, count: int, timeout: float, what: str) -> None:
    """Sends `count` one-chunk sample messages and waits until the supervisor's workers completed them."""
    before = len(sample_results(workdir))
    enqueue_sample_work(queue, count, chunks=1, chunk_ms=1)
    sup.wait_for(lambda: len(sample_results(workdir)) == before + count, timeout, what)


def run_plan(start: Callable[..., Supervisor], env: dict[str, str],
             preexec_fn: Callable[[], None] | None = None) -> dict[str, Any]:
    """`spot-supervisor plan --json` through `start` (the `supervisors` fixture); its JSON."""
    sup = start(env, "plan", "--json", preexec_fn=preexec_fn)
    assert sup.wait(20) == 0, sup.log()
    assert sup.proc.stdout is not None
    plan: dict[str, Any] = json.loads(sup.proc.stdout.read())
    return plan


class Supervisor:
    """One `spot-supervisor` process; stderr (its own and its workers') goes to a file, stdout to a pipe."""

    def __init__(self, env: dict[str, str], workdir: Path, *args: str,
                 preexec_fn: Callable[[], None] | None = None) -> None:
        self.log_path = workdir / f"supervisor-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            if name in os.environ and env.get(name) == os.environ[name]:
                env.pop(name)  # pytest's own (run under systemd?), not one the test set
        self.proc = subprocess.Popen([*SUPERVISOR, *(args or ("run",))], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._log, start_new_session=True,
                                     preexec_fn=preexec_fn)
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], object], timeout: float, what: str) -> None:
        """Poll until condition() is truthy; fails at once (with the log) if the supervisor exited first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            if self.proc.poll() is not None and not condition():
                break
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; supervisor log:\n{self.log()[-3000:]}")

    def wait_for_log(self, needle: str, timeout: float = 15.0) -> None:
        self.wait_for(lambda: needle in self.log(), timeout, repr(needle))

    def workers(self) -> list[psutil.Process]:
        """Live (not zombie) children of the supervisor."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []
        live = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    live.append(child)
            except psutil.NoSuchProcess:
                pass
        return live

    def worker_pids(self) -> set[int]:
        return {p.pid for p in self.workers()}

    def wait_for_workers(self, n: int, timeout: float = 10.0) -> set[int]:
        def exactly_n() -> set[int] | None:
            pids = self.worker_pids()
            return pids if len(pids) == n else None
        return wait_until(exactly_n, timeout, lambda: f"exactly {n} live worker(s); log:\n{self.log()[-3000:]}")

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop_when_holding(self, event_id: str, timeout: float = 15.0) -> int:
        """Once drained and holding for the event (as it does until the VM goes), stop it as systemd would;
        returns its exit status."""
        self.wait_for_log(f"holding until {event_id}", timeout)
        assert self.worker_pids() == set() and self.proc.poll() is None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"supervisor still running after {timeout}s; log:\n{self.log()[-3000:]}") from None

    def cleanup(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)  # the workers share the supervisor's process group
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def worker_settings(azurite: Azurite, name: str, **queue: Any) -> Settings:
    """A worker's test settings (a worker never contacts IMDS: that is the supervisor's), validated."""
    defaults: dict[str, Any] = {"visibility_timeout_s": 30, "retry_delay_s": 1.0, "idle_poll_max_s": 0.2}
    settings = Settings(queue=QueueSettings(connection_string=azurite.connection_string, name=name, **{**defaults, **queue}),
                        workload=WorkloadSettings(handler=RECORD_HANDLER))
    validate(settings)
    return settings


def program_env(azurite: Azurite, queue_name: str, command: str, **spot: str) -> dict[str, str]:
    """child_env for a program as the handler: one worker, one message at a time, quick idle polls and drains."""
    defaults = {"queue_batch_size": "1", "queue_visibility_timeout_s": "30", "shutdown_drain_timeout_s": "5",
                "shutdown_kill_grace_s": "1", "queue_idle_poll_max_s": "0.2", "queue_prefetch_s": "0",
                "scaling_workers": "1"}
    return child_env(azurite, queue_name=queue_name, workload_command=command, **{**defaults, **spot})


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: it runs nothing any more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
