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

from testsupport.azurite import Azurite, connection_string
from testsupport.handlers import read_records, succeeded_ids
from testsupport.harness import worker_settings
from testsupport.proxy import FaultProxy
from testsupport.queues import message_count, peek_texts
from testsupport.waiting import wait_until
from worker.message import Codec, Envelope
from worker.queue.consumer import Consumer, Shared, judged_failures
from worker.queue.lease import LeaseState
from worker.runtime import WorkerRuntime
from worker.settings import Settings
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
