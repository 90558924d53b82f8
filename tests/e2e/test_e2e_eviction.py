"""Eviction end to end: a real supervisor, real workers, a real Azurite, the IMDS simulator over HTTP."""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from azure.storage.queue import QueueClient

from supervisor.simulator.server import ImdsSimulator
from testsupport.handlers import read_records, succeeded_ids
from testsupport.harness import AZURE_FIXTURES, RECORD_HANDLER, Supervisor, processes_sample_work, sample_results
from testsupport.net import free_port
from testsupport.queues import enqueue_sample_work, visible_count


def test_eviction_drains_releases_acknowledges_after_last_exit_and_resumes_elsewhere(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    total = 24
    enqueue_sample_work(queue, total, chunks=20, chunk_ms=40)  # ~0.8 s of CPU per message, checkpoint after each chunk
    alive_at_ack: list[set[int]] = []
    sup = start_evictable()
    sup.wait_for(lambda: len(sample_results(tmp_path)) >= 2, 60, "two messages done")
    workers = sup.worker_pids()
    assert len(workers) == 2
    simulator.on_ack = lambda record: alive_at_ack.append({pid for pid in workers if psutil.pid_exists(pid)})

    notice = simulator.simulate_eviction(delay_s=30)
    noticed = time.monotonic()
    done_at_notice = len(sample_results(tmp_path))
    # Every message not done must be visible again (released), not left invisible until its lease.
    released_within = None
    while time.monotonic() - noticed < 5:
        done = len({r["id"] for r in sample_results(tmp_path)})
        if visible_count(queue) == total - done:
            released_within = time.monotonic() - noticed
            break
        time.sleep(0.01)
    # Acknowledged: it holds, without workers, until the VM goes (here: a stop in its place).
    assert sup.stop_when_holding(notice["EventId"]) == 0
    assert released_within is not None and released_within < 1.0, f"released after {released_within}s"

    acks = simulator.acks()
    assert len(acks) == 1
    assert acks[0]["raw"] == json.dumps({"StartRequests": [{"EventId": notice["EventId"]}]})
    assert acks[0]["headers"].get("Metadata") == "true"
    assert alive_at_ack == [set()], "acknowledged while a worker was still alive"
    log = sup.log()
    assert "every worker stopped receiving" in log and "acknowledged" in log
    assert done_at_notice < total, "the queue ran dry before the eviction: nothing was tested"

    # The replacement VM: a fresh supervisor without events finishes everything,
    # resuming interrupted messages from their checkpoints.
    replacement = start_evictable(events=False)
    replacement.wait_for(lambda: len({r["id"] for r in sample_results(tmp_path)}) == total, 90, "all messages done")
    replacement.proc.send_signal(signal.SIGTERM)
    assert replacement.proc.wait(20) == 0
    records = sample_results(tmp_path)
    assert len({r["id"] for r in records}) == total
    assert any(r["resumed_from"] > 0 for r in records), "no message resumed from a checkpoint"
    assert queue.get_queue_properties().approximate_message_count == 0


@pytest.mark.parametrize("mode", ["500", "410", "429", "garbage", "slow", "reset"])
def test_imds_faults_never_drain_nor_crash_and_a_later_eviction_is_seen(
        mode: str, start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_evictable(scaling_workers="1")
    sup.wait_for_log("ready:")
    simulator.set_faults(mode, count=4, delay_s=1.0 if mode == "slow" else None)
    sup.wait_for_log("scheduled events poll failed", timeout=10)
    processes_sample_work(sup, queue, tmp_path, 3, 30, "work done while IMDS misbehaves")
    assert sup.proc.poll() is None
    assert "drain (" not in sup.log()

    notice = simulator.simulate_eviction(delay_s=30)
    assert sup.stop_when_holding(notice["EventId"]) == 0
    assert len(simulator.acks()) == 1


def test_cancelled_event_resumes_processing(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    # Handlers that ignore ctx.draining keep the drain open long enough for the cancellation to arrive.
    queue.send_message(json.dumps({"sleep": 3, "ignore_drain": True}))
    sup = start_evictable(workload_handler=RECORD_HANDLER)
    sup.wait_for(lambda: read_records(tmp_path / "records.jsonl", "start"), 20, "the handler to start")
    before = sup.worker_pids()
    notice = simulator.simulate_eviction(delay_s=30)
    sup.wait_for_log("drain (Preempt")
    simulator.cancel_event(notice["EventId"])
    sup.wait_for_log("was cancelled")
    # New workers take over while the old ones finish; the service keeps running.
    sup.wait_for(lambda: len(sup.worker_pids() - before) >= 2, 15, "replacement workers")
    queue.send_message(json.dumps({"sleep": 0}))
    sup.wait_for(lambda: len(succeeded_ids(tmp_path / "records.jsonl")) == 2, 20, "both messages done")
    assert sup.proc.poll() is None
    assert simulator.acks() == []
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_events_for_other_vms_are_ignored_and_shared_events_are_not_acknowledged(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    simulator.set_document(json.loads((AZURE_FIXTURES / "scheduledevents-preempt-other-vm.json").read_text()))
    sup.wait_for_log("-> 3: 1 event(s)")
    time.sleep(1.0)  # four polls
    assert sup.proc.poll() is None and "drain (" not in sup.log()

    simulator.set_document(json.loads((AZURE_FIXTURES / "scheduledevents-preempt-shared.json").read_text()))
    sup.wait_for_log("holding until C0FFEE00")  # drained, but not approved for the neighbour: it may still be cancelled
    assert "drain (Preempt C0FFEE00" in sup.log()
    assert "other VMs are listed in it" in sup.log()
    assert sup.worker_pids() == set() and sup.proc.poll() is None
    assert simulator.acks() == []
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0


def test_a_shared_event_cancelled_after_the_drain_resumes_processing(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    notice = simulator.simulate_eviction(delay_s=30, resources=["vm-spot-07", "other-vm"])
    sup.wait_for_log(f"holding until {notice['EventId']}")
    assert sup.worker_pids() == set()
    simulator.cancel_event(notice["EventId"])
    sup.wait_for_log("was cancelled")
    processes_sample_work(sup, queue, tmp_path, 2, 20, "work after the cancelled eviction")
    assert simulator.acks() == []
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_not_on_azure_is_one_warning_and_work_goes_on(start_evictable: Callable[..., Supervisor], queue: QueueClient,
                                                      tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens: like IMDS off Azure
    sup = start_evictable(events_endpoint=nobody, events_vm_name="")
    processes_sample_work(sup, queue, tmp_path, 3, 30, "work done without IMDS")
    warnings = [line for line in sup.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "instance metadata unavailable" in warnings[0], warnings
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_a_stop_during_an_eviction_drain_is_not_undone_by_a_cancellation(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    queue.send_message(json.dumps({"sleep": 2, "ignore_drain": True}))
    sup = start_evictable(workload_handler=RECORD_HANDLER)
    sup.wait_for(lambda: read_records(tmp_path / "records.jsonl", "start"), 20, "the handler to start")
    notice = simulator.simulate_eviction(delay_s=30)
    sup.wait_for_log("drain (Preempt")
    sup.proc.send_signal(signal.SIGTERM)  # systemctl stop meanwhile
    time.sleep(0.3)
    simulator.cancel_event(notice["EventId"])
    sup.wait_for_log("a stop was requested: draining on")
    assert sup.proc.wait(20) == 0
    assert "resuming processing" not in sup.log()
    assert simulator.acks() == []


def test_an_eviction_drain_is_not_a_stop_for_systemd(start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator,
                                                    tmp_path: Path) -> None:
    """STOPPING=1 puts the unit in "deactivating" and systemd kills it after TimeoutStopSec: a hold after the
    acknowledgement (or a resume) would end in a SIGKILL and a restart. Only a stop says STOPPING=1."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.1)
        received: list[str] = []

        def collect() -> list[str]:
            while True:
                try:
                    received.append(sock.recv(65536).decode())
                except (TimeoutError, socket.timeout):
                    return received

        sup = start_evictable(extra_env={"NOTIFY_SOCKET": str(path)})
        sup.wait_for(lambda: any("READY=1" in t.splitlines() for t in collect()), 20, "READY=1")
        notice = simulator.simulate_eviction(delay_s=30)
        sup.wait_for_log(f"holding until {notice['EventId']}", 20)
        texts = collect()
        assert not any("STOPPING=1" in t.splitlines() for t in texts), texts
        assert any(f"STATUS=draining: Preempt {notice['EventId']}" in t for t in texts), texts
        sup.proc.send_signal(signal.SIGTERM)  # (a stop's STOPPING=1: tests/e2e/test_e2e_supervisor.py)
        assert sup.proc.wait(20) == 0
