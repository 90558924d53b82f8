"""Workers talking to Azurite through testsupport.proxy.FaultProxy: stalled renewals (issue 16, defect 6),
a checkpoint during a queue outage (the gap behind it), and every message accounted for through resets,
stalls, garbage and 503s.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_worker / test_supervisor are redefined as parameters)
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite, connection_string
from testsupport.handlers import RECORD_ENV, read_records
from testsupport.harness import RECORD_HANDLER, Supervisor, child_env, worker_settings
from testsupport.proxy import FaultProxy
from testsupport.waiting import wait_until
from worker import context as context_module
from worker.context import Context, StopSignal
from worker.message import Codec, Envelope
from worker.queue.lease import Lease
from worker.queue.poisoned import read_poisoned
from worker.runtime import WorkerRuntime


class ArmedProxy(FaultProxy):
    """A FaultProxy that can also fault exactly the next `n` requests."""

    def __init__(self, target_port: int, **kwargs: object) -> None:
        super().__init__(target_port, **kwargs)  # type: ignore[arg-type]
        self._armed: list[str] = []

    def fault_next(self, mode: str, n: int = 1) -> None:
        with self._lock:
            self._armed.extend([mode] * n)

    def _draw_fault(self, first_bytes: bytes) -> str:
        with self._lock:
            if self._armed:
                mode = self._armed.pop(0)
                self.stats.requests += 1
                self.stats.faults[mode] += 1
                return mode
        return super()._draw_fault(first_bytes)


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[ArmedProxy]:
    with ArmedProxy(azurite.port, stall_s=20.0) as running:
        yield running


def succeeded(record: Path) -> list[dict[str, object]]:
    return [e for e in read_records(record, "end") if e["outcome"] == "succeeded"]


# -- defect 6: one stalled renewal must not cost the other leases ---------------------------------


def test_a_stalled_renewal_does_not_hold_up_the_others(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                       record_path: Path, tmp_path: Path, proxy: ArmedProxy,
                                                       runtimes: Callable[..., WorkerRuntime]) -> None:
    go = tmp_path / "go"
    for i in range(4):
        queue.send_message(json.dumps({"wait_file": str(go), "timeout": 60, "ignore_drain": True, "n": i}))
    settings = worker_settings(azurite, queue_name, batch_size=1, prefetch_s=0, visibility_timeout_s=6)
    settings = replace(settings, queue=replace(settings.queue, connection_string=connection_string(proxy.port)))
    runtime = runtimes(settings, threads=4)
    wait_until(lambda: len(read_records(record_path, "start")) == 4, 15, what="four handlers to hold a message each")

    # Only renewals flow now (every consumer thread is busy): the next one stalls for 20 s. Before the fix the
    # keeper waited on it while the other three leases ran out after 6 s.
    proxy.fault_next("stall")
    taken: list[str] = []
    until = time.monotonic() + 10  # well past the 6-s visibility timeout
    while time.monotonic() < until:  # another consumer, straight to Azurite: it gets only what a lease lost
        taken += [m.id for m in queue.receive_messages(max_messages=32, visibility_timeout=60)]
        time.sleep(0.2)
    go.touch()

    wait_until(lambda: runtime.stats()["succeeded"] == 4, 15, what="the four messages to be deleted")
    assert proxy.stats.faults["stall"] == 1
    assert taken == []
    assert runtime.stats()["lease_lost"] == 0 and len(read_records(record_path, "start")) == 4


# -- the gap: ctx.checkpoint during a queue outage -----------------------------------------------


def test_a_checkpoint_during_a_queue_outage_is_retried_not_raised(azurite: Azurite, queue: QueueClient,
                                                                   queue_name: str, record_path: Path, tmp_path: Path,
                                                                   proxy: ArmedProxy,
                                                                   runtimes: Callable[..., WorkerRuntime]) -> None:
    go = tmp_path / "go"
    queue.send_message(json.dumps({"wait_file": str(go), "after_wait_checkpoint": {"k": 1}}))
    settings = worker_settings(azurite, queue_name, visibility_timeout_s=60)
    settings = replace(settings, queue=replace(settings.queue, connection_string=connection_string(proxy.port)))
    runtime = runtimes(settings)
    wait_until(lambda: read_records(record_path, "start"), 15, what="the handler to start")

    # 25 s of 503s: longer than the SDK's own retries of one call (~16 s here). Before the fix the checkpoint
    # raised into the handler, and the message counted a failure for the queue's outage.
    proxy.set_fault("http503")
    timer = threading.Timer(25.0, proxy.set_fault, args=("pass",))
    timer.start()
    try:
        go.touch()
        wait_until(lambda: read_records(record_path, "end"), 90, what="the handler to finish")
    finally:
        timer.cancel()
    assert [c["stored"] for c in read_records(record_path, "checkpoint")] == [True]
    assert [e["outcome"] for e in read_records(record_path, "end")] == ["succeeded"]
    assert proxy.stats.faults["http503"] > 0
    wait_until(lambda: runtime.stats()["succeeded"] == 1, 10, what="the delete")


class _Unreachable:
    """A queue client whose every call fails the way an unreachable service does."""

    def update_message(self, *args: object, **kwargs: object) -> object:
        raise ServiceResponseError("connection refused")


def test_a_checkpoint_that_keeps_failing_lets_the_handler_go_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(context_module, "CHECKPOINT_RETRY_BASE_S", 0.01)
    lease = Lease(_Unreachable(), Codec("none"), "id-1", "receipt", Envelope("body"), 30)  # type: ignore[arg-type]
    ctx = Context(lease, Codec("none"), StopSignal(), context_module.log)
    assert ctx.checkpoint({"k": 1}) is False  # not stored, not raised
    assert ctx.state is None and lease.envelope == Envelope("body")


# -- every message accounted for through resets, stalls, garbage and 503s ------------------------


def test_every_message_is_accounted_for_through_queue_faults(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                             tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    record = tmp_path / "attempts.jsonl"
    modes = ("reset", "stall", "garbage", "http503")
    bodies: list[str] = []
    with FaultProxy(azurite.port, stall_s=2.0, seed=16) as proxy:
        env = child_env(azurite, queue_name=queue_name, workload_handler=RECORD_HANDLER, scaling_workers="2",
                        queue_visibility_timeout_s="5", queue_idle_poll_max_s="0.5", queue_batch_size="4",
                        queue_connection_string=connection_string(proxy.port), shutdown_drain_timeout_s="5")
        env[RECORD_ENV] = str(record)
        sup = supervisors(env)
        phase = 0
        until = time.monotonic() + 60
        # Each mode in turn for a second, on half the requests, with work arriving all along (so receives,
        # renewals, checkpoints, deletes and releases all meet faults), until every mode hit at least twice.
        while time.monotonic() < until and not (phase >= 8 and all(proxy.stats.faults[m] >= 2 for m in modes)):
            proxy.set_fault(modes[phase % len(modes)], 0.5)
            for _ in range(8):
                body = json.dumps({"sleep": 0.05, "checkpoint": {"phase": phase}, "n": len(bodies)})
                queue.send_message(body)  # straight to Azurite: the producer is not under test
                bodies.append(body)
            time.sleep(1.0)
            phase += 1
        proxy.set_fault("pass")

        def accounted() -> bool:
            done = {e["body"] for e in read_records(record, "start")
                    if e["id"] in {s["id"] for s in succeeded(record)}}
            poison = azurite.queue(f"{queue_name}-poison")
            poisoned = {read_poisoned(m.content)[0] for m in poison.peek_messages(max_messages=32)} if _exists(poison) else set()
            return done | poisoned == set(bodies) and queue.get_queue_properties().approximate_message_count == 0

        wait_until(accounted, 120, what=lambda: f"every message done or poisoned; log:\n{sup.log()[-2000:]}")
        assert all(proxy.stats.faults[m] >= 1 for m in modes), proxy.stats
        starts = read_records(record, "start")
        print(f"\n{len(bodies)} messages, {len(starts)} attempts, {len(succeeded(record))} succeeded; proxy: "
              f"{proxy.stats.requests} requests, faults {dict(proxy.stats.faults)}")
        sup.send(15)
        assert sup.wait(20) == 0, sup.log()[-3000:]


def _exists(client: QueueClient) -> bool:
    try:
        client.get_queue_properties()
    except Exception:
        return False
    return True
