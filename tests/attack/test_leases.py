"""Hostile conditions for the worker's leases (issue 21): lost Delete responses, a full shared lease table,
a deleted poison queue, a release at the deadline. Real workers, a real Azurite, FaultProxy between them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from supervisor.pool.lease_guard import LeaseGuard
from testsupport.azurite import Azurite, connection_string
from testsupport.handlers import RECORD_ENV, read_records, succeeded_ids
from testsupport.harness import RECORD_HANDLER, Supervisor, child_env, worker_settings
from testsupport.proxy import FaultProxy
from testsupport.queues import message_count, peek_texts, poisoned_originals
from testsupport.waiting import wait_until
from worker.message import Codec, Envelope
from worker.queue.consumer import Consumer, Shared, judged_failures, most_held
from worker.queue.lease import LeaseState
from worker.queue.lease_slots import LeaseSlots
from worker.runtime import WorkerRuntime
from worker.settings import QueueSettings, Settings
from worker.telemetry.providers import Telemetry


@pytest.fixture
def lost_deletes(azurite: Azurite) -> Iterator[FaultProxy]:
    """Every Delete reaches Azurite (the message is gone) but its response never comes back."""
    with FaultProxy(azurite.port, mode="lost", methods=("DELETE",), stall_s=60.0) as proxy:
        yield proxy


# -- high 3: messages that never ran were counted as failed and poisoned ----------------------------


def test_lost_delete_responses_never_count_a_message_as_failed(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path, lost_deletes: FaultProxy,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    # Before: every final Delete hung until its request timed out (with the SDK's retries), holding its lease's
    # lock; the keeper's renewal threads all blocked on those locks, the unstarted messages of the batch ran
    # out of lease, another consumer received them, and each expiry counted as a failure: poisoned unrun.
    sent = {queue.send_message(json.dumps({"n": i})).id for i in range(16)}
    through_proxy = connection_string(lost_deletes.port)
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()

    def settings(**queue_settings: object) -> Settings:
        base = worker_settings(azurite, queue_name, visibility_timeout_s=2, request_timeout_s=1.0, max_dequeue_count=1,
                               **queue_settings)
        return replace(base, queue=replace(base.queue, connection_string=through_proxy))

    first = runtimes(settings(batch_size=16, prefetch_s=0))
    wait_until(lambda: read_records(record_path, "start"), 10, what="the first worker to take the batch")
    second = runtimes(settings(batch_size=1, prefetch_s=0))  # takes whatever the first lets go

    wait_until(lambda: succeeded_ids(record_path) >= sent or peek_texts(poison), 120,
               what=lambda: f"every message to be processed ({len(succeeded_ids(record_path))} of {len(sent)})")
    wait_until(lambda: message_count(queue) == 0, 60, what="every message to leave the queue")
    assert lost_deletes.stats.faults["lost"] > 0  # the deletes really went unanswered
    assert [e for e in read_records(record_path, "end") if e["outcome"] != "succeeded"] == []
    for runtime in (first, second):
        stats = runtime.stats()
        assert (stats["failed"], stats["poisoned"]) == (0, 0), stats
    assert peek_texts(poison) == []
    assert succeeded_ids(record_path) == sent


def test_a_message_received_again_while_held_unstarted_is_not_a_failure(
        azurite: Azurite, queue: QueueClient, queue_name: str, telemetry: Telemetry) -> None:
    # Before: the new lease silently replaced the first in the table, the first still ran from its batch (a
    # second run of the same message), and prior_failures counted the expired delivery as a failed attempt.
    sent = queue.send_message("held twice")
    settings = worker_settings(azurite, queue_name, visibility_timeout_s=1, max_dequeue_count=1).queue
    shared = Shared(settings, lambda m, c: None, telemetry, Codec("none"))
    consumer = Consumer(shared)
    [(first, _, _)] = consumer.receive_batch(1) or []
    time.sleep(1.5)  # its lease runs out while it waits (no keeper runs here)
    [(second, message, prior_failures)] = wait_until(lambda: consumer.receive_batch(1), 5, what="the message again")
    assert (message.id, message.dequeue_count) == (sent.id, 2)
    assert prior_failures == 0, "a delivery whose handler never ran was counted as a failure"
    assert second.envelope.releases == 1  # recorded by its next settle
    assert first.state is LeaseState.DONE and not first.start(), "the first delivery could still run"
    assert shared.leases.snapshot() == [second]
    shared.leases.remove(first)  # what the consumer does with a lease that would not start
    assert shared.leases.snapshot() == [second], "removing the old lease dropped the new one"
    assert second.release()


def test_an_unstarted_lease_that_ran_out_is_not_run(
        azurite: Azurite, queue: QueueClient, queue_name: str, telemetry: Telemetry) -> None:
    queue.send_message("expired")
    settings = worker_settings(azurite, queue_name, visibility_timeout_s=1).queue
    shared = Shared(settings, lambda m, c: None, telemetry, Codec("none"))
    [(lease, _, _)] = Consumer(shared).receive_batch(1) or []
    time.sleep(1.2)
    assert not lease.start(), "ran a message whose lease had run out: another consumer may be running it"
    assert lease.state is LeaseState.DONE


def test_failures_are_judged_from_the_message_and_a_crash_loop_still_ends_in_poison() -> None:
    plain = Envelope("body")
    assert judged_failures(replace(plain, failures=2), 3, 3) == 2
    assert judged_failures(replace(plain, releases=5), 6, 1) == 0
    # Unaccounted deliveries (expired unstarted, or a crash) count only past a grace of max_dequeue_count.
    assert judged_failures(plain, 4, 3) == 0
    assert judged_failures(plain, 2 * 3 + 1, 3) == 3  # a message that kills its worker every time: poisoned


def test_a_failure_is_recorded_in_the_message(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    sent = queue.send_message(json.dumps({"fail_until": 1}))
    runtime = runtimes(worker_settings(azurite, queue_name, max_dequeue_count=2, retry_delay_s=0.5))
    wait_until(lambda: runtime.stats()["failed"] == 1, 10, what="the first attempt to fail")
    runtime.stop_receiving(time.time() + 5)
    [peeked] = wait_until(lambda: queue.peek_messages(max_messages=1), 10, what="the message to be visible again")
    envelope, _ = Codec("none").open(peeked.content, peeked.id)
    assert (peeked.id, envelope.failures, envelope.releases) == (sent.id, 1, 0)
    assert [s["dequeue_count"] for s in read_records(record_path, "start")] == [1]


# -- high 4: the shared lease table was smaller than what a worker holds ---------------------------


def test_a_worker_holding_the_gil_with_messages_received_ahead_runs_each_message_once(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
        supervisors: Callable[..., Supervisor]) -> None:
    # Before: the table had threads x batch_size slots; a batch received ahead while the last one ran or settled
    # got none, so while a handler held the GIL nothing renewed those messages: their leases ran out, the
    # other worker ran them, and the first ran them again. Each hold is shorter than the visibility timeout: a
    # queue call of the worker's own caught mid-flight by a hold keeps its slot locked (and the guard out) for
    # the hold, which a lease must outlast (a limit of the design, not what this test is about).
    record = tmp_path / "attempts.jsonl"
    sent = {queue.send_message(json.dumps({"hold_gil_s": 1.6, "n": i})).id for i in range(8)}
    env = child_env(azurite, queue_name=queue_name, queue_batch_size="2", queue_prefetch_s="0",
                    queue_visibility_timeout_s="2", queue_idle_poll_max_s="0.2", queue_max_dequeue_count="5",
                    scaling_workers="2", workload_handler=RECORD_HANDLER)
    env[RECORD_ENV] = str(record)
    sup = supervisors(env)
    wait_until(lambda: succeeded_ids(record) >= sent, 90,
               what=lambda: f"every message to be processed ({len(succeeded_ids(record))} of {len(sent)})")
    wait_until(lambda: message_count(queue) == 0, 20, what="every message to leave the queue")
    starts = read_records(record, "start")
    assert sorted(s["id"] for s in starts) == sorted(sent), f"a message ran twice: {starts}\n{sup.log()[-3000:]}"
    assert "no slot in the shared lease table" not in sup.log()


def test_the_shared_lease_table_has_room_for_everything_a_worker_can_hold() -> None:
    settings = QueueSettings(connection_string="x", batch_size=5, max_outstanding_settles=3)
    # Per thread its batch and the next one received ahead, plus the final calls still under way.
    assert LeaseGuard.new_table(2, settings).slots == most_held(2, settings) == 2 * 2 * 5 + 3


def test_the_shared_lease_table_cannot_overflow_silently(
        azurite: Azurite, queue: QueueClient, queue_name: str, telemetry: Telemetry,
        caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        queue.send_message(f"m{i}")
    settings = worker_settings(azurite, queue_name).queue
    slots = LeaseSlots(2)
    shared = Shared(settings, lambda m, c: None, telemetry, Codec("none"), lease_slots=slots)
    consumer = Consumer(shared)
    assert len(consumer.receive_batch(3) or []) == 2, "received more messages than there are free slots"
    assert consumer.receive_batch(1) is None
    assert "every slot of the shared lease table is taken" in caplog.text

    # A message that finds no slot after all (another thread took the last one meanwhile) is given back.
    [straggler] = list(queue.receive_messages(max_messages=1, visibility_timeout=30))
    assert consumer.open(straggler) is None
    assert f"no slot in the shared lease table for message {straggler.id}" in caplog.text
    [again] = wait_until(lambda: queue.peek_messages(max_messages=1), 5, what="the message given back")
    assert Codec("none").open(again.content, again.id)[0].releases == 1  # given back, not failed
    assert len(shared.leases) == 2


# -- medium: a deleted poison queue was read as a lost lease -----------------------------------------


def test_a_deleted_poison_queue_is_created_again_and_the_message_lands_in_it(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime], caplog: pytest.LogCaptureFixture) -> None:
    # Before: the send's 404 (QueueNotFound) was taken for a lost lease; the message stayed on the queue, came
    # back every visibility timeout, and the log said "moved to ...-poison" each time although nothing moved.
    poison = azurite.queue(f"{queue_name}-poison")
    queue.send_message(json.dumps({"fail": True, "n": 1}))
    runtime = runtimes(worker_settings(azurite, queue_name, max_dequeue_count=1, visibility_timeout_s=2))
    wait_until(lambda: runtime.stats()["poisoned"] == 1, 10, what="the first message to be poisoned")
    poison.delete_queue()  # by an operator, say, while the worker runs

    second = json.dumps({"fail": True, "n": 2})
    queue.send_message(second)
    wait_until(lambda: runtime.stats()["poisoned"] == 2, 10,
               what=lambda: f"the second message to be poisoned: {runtime.stats()}")
    assert poisoned_originals(poison) == [second]
    assert message_count(queue) == 0
    assert runtime.stats()["lease_lost"] == 0
    assert [r for r in read_records(record_path, "start") if r["body"] == second][0]["dequeue_count"] == 1
    assert caplog.text.count(f"moved to {queue_name}-poison") == 2


# -- low: a message released at the deadline was counted twice ---------------------------------------


def test_a_message_released_at_the_deadline_is_counted_once(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    # Before: counted "released" by the deadline, then "lease_lost" when its handler returned.
    queue.send_message(json.dumps({"sleep": 1.5, "ignore_drain": True}))
    runtime = runtimes(worker_settings(azurite, queue_name))
    wait_until(lambda: read_records(record_path, "start"), 10, what="the handler to start")
    assert runtime.abandon() == 1
    wait_until(lambda: read_records(record_path, "end"), 10, what="the handler to return")
    wait_until(lambda: runtime.stats()["held"] == 0, 5, what="the lease to be dropped")
    stats = runtime.stats()
    assert (stats["released"], stats["lease_lost"], stats["succeeded"]) == (1, 0, 0), stats
