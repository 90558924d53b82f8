"""Leases that outlive a handler holding the GIL, and messages of a worker killed at the drain deadline
(issue 16, defect 3): a real supervisor, real workers, a handler stuck in one C call (libc usleep through
ctypes.PyDLL, which keeps the GIL), Azurite.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.handlers import RECORD_ENV, read_records
from testsupport.harness import RECORD_HANDLER, Supervisor, child_env
from testsupport.queues import message_count, peek_texts
from testsupport.waiting import wait_until
from worker.message import Codec, Envelope
from worker.queue.lease import Lease
from worker.queue.lease_slots import LeaseSlots


def record_env(azurite: Azurite, queue_name: str, record: Path, **spot: str) -> dict[str, str]:
    defaults = {"queue_batch_size": "1", "queue_prefetch_s": "0", "queue_idle_poll_max_s": "0.2",
                "workload_handler": RECORD_HANDLER, "shutdown_kill_grace_s": "1"}
    env = child_env(azurite, queue_name=queue_name, **{**defaults, **spot})
    env[RECORD_ENV] = str(record)
    return env


def succeeds_in_one_attempt(azurite: Azurite, queue: QueueClient, queue_name: str, record: Path,
                            supervisors: Callable[..., Supervisor], body: dict[str, Any], **spot: str) -> Supervisor:
    """Sends one message, runs a supervisor on it and checks it ran once, on its first delivery, and succeeded."""
    sent = queue.send_message(json.dumps(body))
    sup = supervisors(record_env(azurite, queue_name, record, **spot))
    sup.wait_for_workers(int(spot["scaling_workers"]))
    wait_until(lambda: read_records(record, "end"), 30, what="the handler to finish")
    assert [(s["id"], s["dequeue_count"]) for s in read_records(record, "start")] == [(sent.id, 1)], sup.log()[-3000:]
    assert [e["outcome"] for e in read_records(record, "end")] == ["succeeded"]
    return sup


def test_a_handler_holding_the_gil_past_the_visibility_timeout_keeps_its_lease(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
        supervisors: Callable[..., Supervisor]) -> None:
    # Before: the worker's keeper thread stopped with the GIL, the lease expired after 2 s, the other worker
    # ran the message again (and again), and the attempts that succeeded were counted toward poison.
    sup = succeeds_in_one_attempt(azurite, queue, queue_name, tmp_path / "attempts.jsonl", supervisors, {"hold_gil_s": 5},
                                  scaling_workers="2", queue_visibility_timeout_s="2", queue_max_dequeue_count="2")
    wait_until(lambda: message_count(queue) == 0, 5, what="the delete")
    assert "renewing it on the worker's behalf" in sup.log()
    assert "the lease keeper could not run for" in sup.log()  # and the worker says why, once it can
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


def test_a_worker_killed_at_the_drain_deadline_gives_its_message_back_as_a_release(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
        supervisors: Callable[..., Supervisor]) -> None:
    # Before: the stuck worker was SIGKILLed holding the message; it stayed invisible for its lease, then the
    # next attempt counted the killed one as a failure (max_dequeue_count 1: poisoned by an eviction alone).
    record = tmp_path / "attempts.jsonl"
    body = json.dumps({"hold_gil_s": 6, "hold_gil_until": 1, "checkpoint": {"step": 1}})
    sent = queue.send_message(body)
    env = record_env(azurite, queue_name, record, scaling_workers="1", queue_visibility_timeout_s="30",
                     queue_max_dequeue_count="1", shutdown_drain_timeout_s="1")
    sup = supervisors(env)
    wait_until(lambda: read_records(record, "checkpoint"), 20, what="the handler to checkpoint, then hold the GIL")
    sup.send(signal.SIGTERM)
    assert sup.wait(15) == 0, sup.log()[-3000:]
    assert "killing it" in sup.log() and "given back with their release recorded" in sup.log()

    # Visible at once (not after its 30 s lease), with the release and the checkpoint recorded.
    [peeked] = queue.peek_messages(max_messages=32)
    envelope, opened_body = Codec("none").open(peeked.content, peeked.id)
    assert (peeked.id, opened_body, envelope.releases, envelope.state) == (sent.id, body, 1, {"step": 1})

    again = supervisors(env)
    wait_until(lambda: read_records(record, "end"), 20, what="the second attempt to finish")
    assert [e["outcome"] for e in read_records(record, "end")] == ["succeeded"], again.log()[-3000:]
    assert [s["state"] for s in read_records(record, "start")] == [None, {"step": 1}]
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


def test_lease_slots_lock_out_the_other_process_and_keep_the_newest_receipt(tmp_path: Path) -> None:
    import os

    slots = LeaseSlots(4)
    index = slots.claim("id-1", "receipt-1", 30, "release text é")
    assert index is not None
    held = slots.read(index)
    assert held is not None and (held.message_id, held.pop_receipt, held.release_text) == ("id-1", "receipt-1", "release text é")
    with slots.locked(index):
        pid = os.fork()
        if pid == 0:  # another process (as the supervisor is) cannot take the slot while this one holds it
            os._exit(0 if not slots.try_lock(index) else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        slots.record(index, "receipt-2", 123.0)
    pid = os.fork()
    if pid == 0:
        taken = slots.try_lock(index)
        os._exit(0 if taken and slots.pop_receipt(index) == "receipt-2" else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    with slots.locked(index):
        slots.free(index)
    assert slots.read(index) is None and slots.held_indices() == []
    slots.close()


def test_an_undecodable_message_still_gets_a_slot_on_its_way_to_poison() -> None:
    slots = LeaseSlots(2)
    lease = Lease(None, Codec("base64"), "id-1", "receipt", Envelope("not base64!"), 30, slots)  # type: ignore[arg-type]
    assert lease.slot is not None
    with slots.locked(lease.slot):
        held = slots.read(lease.slot)
    assert held is not None and held.release_text is None  # given back, if ever, without rewriting it
    slots.close()


def test_a_worker_silent_because_it_computes_holding_the_gil_is_left_running(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
        supervisors: Callable[..., Supervisor]) -> None:
    # The heartbeat stops with the GIL as the lease keeper does; a stopped or deadlocked worker uses no CPU and is
    # replaced, but one that computes is busy: killing it would turn a success into a failed attempt.
    sup = succeeds_in_one_attempt(azurite, queue, queue_name, tmp_path / "attempts.jsonl", supervisors, {"burn_gil_s": 7},
                                  scaling_workers="1", queue_visibility_timeout_s="2", scaling_worker_timeout_s="2")
    assert "but is computing" in sup.log()
    assert "killing it" not in sup.log()
