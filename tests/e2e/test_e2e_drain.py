"""The supervisor's drain under hostile Scheduled Events (issue 16): a real supervisor, real workers,
a real Azurite, the IMDS simulator serving raw documents over HTTP."""

from __future__ import annotations

import email.utils
import json
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient

from supervisor.simulator.server import ImdsSimulator
from testsupport.handlers import read_records
from testsupport.harness import RECORD_HANDLER, Supervisor, processes_sample_work
from testsupport.waiting import wait_until

VM = "vm-spot-07"
ALL_TYPES = "Freeze,Preempt,Terminate,Reboot,Redeploy"


def raw_event(event_id: str, event_type: str, not_before: float | None, resources: tuple[str, ...] = (VM,),
              **changes: Any) -> dict[str, Any]:
    return {"EventId": event_id, "EventStatus": "Scheduled", "EventType": event_type, "ResourceType": "VirtualMachine",
            "Resources": list(resources), "Description": "", "EventSource": "Platform", "DurationInSeconds": -1,
            "NotBefore": "" if not_before is None else email.utils.formatdate(not_before, usegmt=True), **changes}


def acked_ids(simulator: ImdsSimulator) -> list[str]:
    return sorted(r["EventId"] for ack in simulator.acks() for r in ack["body"]["StartRequests"])


def timeline(log: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads(log.split("drain timeline ", 1)[1].splitlines()[0])
    return record


def test_a_freeze_does_not_hide_a_preempt_in_the_same_document(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator) -> None:
    sup = start_evictable(events_drain_on=ALL_TYPES)
    sup.wait_for_log("ready:")
    now = int(time.time())
    simulator.set_document({"DocumentIncarnation": 5, "Events": [raw_event("F1", "Freeze", now + 60),
                                                                  raw_event("P1", "Preempt", now + 30)]})
    sup.wait_for_log("holding until P1")  # the most final event decides: the VM is going
    time.sleep(1.0)  # four polls: nothing resumes behind the freeze
    log = sup.log()
    assert "resuming processing" not in log
    assert acked_ids(simulator) == ["F1", "P1"]  # each event this VM may approve
    drain = timeline(log)
    assert drain["events"] == ["F1", "P1"]
    assert drain["deadline"] == now + 30 - 5.0  # the earliest deadline: the Preempt's NotBefore less the margin
    assert sup.worker_pids() == set() and sup.proc.poll() is None
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0


def test_a_stop_during_a_drain_is_not_undone_by_a_freeze(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    queue.send_message(json.dumps({"sleep": 2, "ignore_drain": True}))
    sup = start_evictable(workload_handler=RECORD_HANDLER, events_drain_on=ALL_TYPES)
    sup.wait_for(lambda: read_records(tmp_path / "records.jsonl", "start"), 20, "the handler to start")
    sup.proc.send_signal(signal.SIGTERM)  # systemctl stop
    sup.wait_for_log("drain (SIGTERM")
    simulator.add_event("Freeze", delay_s=60)
    sup.wait_for_log("Freeze")
    assert sup.proc.wait(20) == 0
    assert "resuming processing" not in sup.log()


def test_a_malformed_event_for_another_vm_does_not_hide_a_preempt(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    now = time.time()
    bad = raw_event("O1", "Preempt", now + 30, resources=("other-vm",), DurationInSeconds=7.5)
    unreadable = {"EventId": "O2", "Resources": "other-vm"}
    simulator.set_document({"DocumentIncarnation": 3, "Events": [bad, unreadable, raw_event("P1", "Preempt", now + 30)]})
    sup.wait_for_log("holding until P1")
    time.sleep(1.0)  # more polls of the same document
    log = sup.log()
    assert log.count("DurationInSeconds must be int") == 1, "logged on every poll, not once"
    assert log.count("Resources must be list") == 1
    assert acked_ids(simulator) == ["P1"]
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0


def test_an_acknowledged_event_that_is_not_carried_out_resumes_processing(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    notice = simulator.simulate_eviction(delay_s=30)
    sup.wait_for_log(f"holding until {notice['EventId']}")  # acknowledged, and still here: hold, do not exit
    assert acked_ids(simulator) == [notice["EventId"]]
    assert "acknowledged, waiting for the VM to go" in sup.log()
    simulator.cancel_event(notice["EventId"])  # the platform never went ahead
    sup.wait_for_log("was cancelled")
    processes_sample_work(sup, queue, tmp_path, 2, 20, "work after the event went away")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_an_event_that_disappears_after_it_started_resumes_processing(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    notice = simulator.simulate_eviction(delay_s=1.0, resources=[VM, "other-vm"])  # not ours to acknowledge
    sup.wait_for_log(f"holding until {notice['EventId']}")
    sup.wait_for(lambda: "Started" in json.dumps(simulator.events_document()), 5, "the event to start")
    time.sleep(0.6)  # the supervisor sees it Started
    simulator.cancel_event(notice["EventId"])  # ... and it goes away, while this VM is still running
    sup.wait_for_log("was cancelled")
    processes_sample_work(sup, queue, tmp_path, 2, 20, "work after the event went away")
    assert simulator.acks() == []
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_an_older_document_does_not_undo_a_drain(start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator) -> None:
    sup = start_evictable()
    sup.wait_for_log("ready:")
    current = {"DocumentIncarnation": 10,
               "Events": [raw_event("P1", "Preempt", time.time() + 30, resources=(VM, "other-vm"))]}
    simulator.set_document(current)
    sup.wait_for_log("holding until P1")
    for _ in range(4):  # a stale IMDS answer flapping with the current one
        simulator.set_document({"DocumentIncarnation": 9, "Events": []})
        time.sleep(0.6)
        simulator.set_document(current)
        time.sleep(0.6)
    log = sup.log()
    assert "was cancelled" not in log and "resuming processing" not in log
    assert log.count("older than the last one seen") == 1
    assert sup.worker_pids() == set()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(15) == 0


class WatchdogPings:
    """A NOTIFY_SOCKET that records when each WATCHDOG=1 arrived, and every other message."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.times: list[float] = []
        self.texts: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.sock.recv(65536).decode()
                if text == "WATCHDOG=1":
                    self.times.append(time.monotonic())
                else:
                    self.texts.append(text)
            except (TimeoutError, socket.timeout):
                pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_a_failed_acknowledgement_is_retried_without_blocking_the_main_loop(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, tmp_path: Path) -> None:
    attempts: list[float] = []

    def failing_ack(record: dict[str, Any]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 4:  # more failures than the attempts made before deciding: it holds, and retries
            time.sleep(1.0)  # a slow IMDS, then the connection drops without an answer
            raise ConnectionError("IMDS hiccup")

    simulator.on_ack = failing_ack
    pings = WatchdogPings(tmp_path / "notify.sock")
    try:
        sup = start_evictable(events_request_timeout_s="3",
                    extra_env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"})
        sup.wait_for_log("ready:")
        notice = simulator.simulate_eviction(delay_s=30)
        sup.wait_for(lambda: len(simulator.acks()) == 1, 30, "a successful acknowledgement")
        log = sup.log()
        assert f"holding until {notice['EventId']}" in log
        assert "failed (attempt 4" in log
        during = [t for t in pings.times if attempts[0] <= t <= attempts[-1]]
        gaps = [b - a for a, b in zip(during, during[1:])]
        assert len(during) >= 10 and max(gaps) < 0.5, f"the loop stopped while acknowledging: gaps {gaps}"
        # systemd's STATUS says why it holds: first the failing acknowledgement, then the VM it waits for.
        wait_until(lambda: any("acknowledged, waiting for the VM to go" in t for t in pings.texts), 10, "STATUS")
        assert any(f"STATUS=drained, holding for Preempt {notice['EventId']} (acknowledgement failed" in t
                   for t in pings.texts), pings.texts
        sup.proc.send_signal(signal.SIGTERM)
        assert sup.proc.wait(15) == 0
    finally:
        pings.close()
