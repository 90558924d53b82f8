"""Settling off the handler's path and receiving ahead (issue 13), against a real Azurite behind a
latency/fault proxy: deletes in flight at a drain, deletes that fail, the bound on outstanding
settles, and the next Get Messages issued while a batch's last message runs."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.handlers import read_records
from testsupport.harness import worker_settings
from testsupport.proxy import FaultProxy
from testsupport.queues import message_count
from testsupport.waiting import wait_until
from worker.queue.consumer import Consumer
from worker.queue.lease import LeaseState
from worker.queue.settle import Settler
from worker.runtime import WorkerRuntime
from worker.settings import QueueSettings, Settings


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with FaultProxy(azurite.port) as running:
        yield running


def settings_via(proxy: FaultProxy, name: str, **queue: Any) -> Settings:
    """Workers talk to Azurite through the proxy; the test's own client talks to it directly."""
    return worker_settings(Azurite(proxy.port), name, **queue)


def test_a_finished_message_whose_delete_is_in_flight_when_a_drain_starts_is_deleted(
        queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    proxy.delay_s = 1.0  # every response, the delete's included, takes a second
    queue.send_message("finish me")
    runtime = runtimes(settings_via(proxy, queue_name))
    wait_until(lambda: runtime.shared.settler.outstanding == 1, 10, what="the handler to finish and its delete to start")
    runtime.stop_receiving(time.time() + 30)
    assert not runtime.idle(), "drained while the delete was still under way"

    wait_until(runtime.idle, 10, what="the delete to finish")
    assert message_count(queue) == 0
    stats = runtime.stats()
    assert (stats["succeeded"], stats["released"], stats["lease_lost"]) == (1, 0, 0)


def test_a_finished_message_waiting_for_a_settle_slot_is_deleted_not_released_at_the_deadline(
        queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    """One settle at a time: the first message's delete is under way and the second, finished, waits for the
    slot when the deadline comes. The deadline gives back what handlers still hold, never a finished message."""
    proxy.delay_s = 1.0
    queue.send_message("first")
    queue.send_message("second")
    runtime = runtimes(settings_via(proxy, queue_name, batch_size=2, prefetch_s=0, max_outstanding_settles=1))
    wait_until(lambda: [lease.state for lease in runtime.shared.leases.snapshot()] == [LeaseState.SETTLING] * 2, 10,
               what="both handlers to finish")
    assert runtime.shared.settler.outstanding == 1  # the second one waits for the slot
    runtime.abandon()

    wait_until(runtime.idle, 10, what="both deletes to finish")
    assert message_count(queue) == 0
    stats = runtime.stats()
    assert (stats["succeeded"], stats["released"]) == (2, 0)


def test_a_delete_that_fails_leaves_the_message_to_reappear(
        queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path, tmp_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    go = tmp_path / "go"
    queue.send_message(json.dumps({"wait_file": str(go)}))
    runtime = runtimes(settings_via(proxy, queue_name, visibility_timeout_s=8))
    wait_until(lambda: read_records(record_path, "start"), 10, what="the handler to start")

    proxy.set_fault("http503")  # the queue service is busy: every request fails, the SDK's retries too
    go.touch()
    wait_until(lambda: runtime.stats()["lease_lost"] == 1, 60, what="the delete to fail (after the SDK's retries)")
    assert runtime.stats()["succeeded"] == 0  # counted only when the queue confirmed it

    proxy.set_fault("pass")
    starts = wait_until(lambda: len(read_records(record_path, "start")) == 2 and read_records(record_path, "start"), 30,
                        what="the message to reappear and run again")
    assert starts[1]["id"] == starts[0]["id"] and starts[1]["dequeue_count"] == 2
    wait_until(lambda: runtime.stats()["succeeded"] == 1, 10, what="the second attempt's delete")
    wait_until(lambda: message_count(queue) == 0, 5, what="the message to be gone")


def test_outstanding_settles_are_bounded(queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path,
                                         runtimes: Callable[..., WorkerRuntime]) -> None:
    proxy.delay_s = 0.2
    for i in range(12):
        queue.send_message(f"m{i}")
    runtime = runtimes(settings_via(proxy, queue_name, batch_size=32, prefetch_s=0, max_outstanding_settles=3))
    wait_until(lambda: runtime.stats()["succeeded"] == 12, 30, what="every message to be deleted")
    assert runtime.shared.settler.peak == 3  # reached the bound (the handlers outran the deletes), never passed it
    assert message_count(queue) == 0


def test_scale_up_threads_share_one_bounded_settler(queue: QueueClient, queue_name: str, proxy: FaultProxy,
                                                   record_path: Path, runtimes: Callable[..., WorkerRuntime]) -> None:
    proxy.delay_s = 0.2
    for i in range(12):
        queue.send_message(f"m{i}")
    runtime = runtimes(settings_via(proxy, queue_name, batch_size=4, prefetch_s=0, max_outstanding_settles=2), threads=3)
    wait_until(lambda: runtime.stats()["succeeded"] == 12, 30, what="every message to be deleted")
    assert runtime.shared.settler.peak == 2  # three consumer threads, one bound for the process
    assert message_count(queue) == 0
    assert len({r["thread"] for r in read_records(record_path, "start")}) > 1


def gaps_between_messages(record_path: Path) -> list[float]:
    """Seconds from each message's end to the next message's start (one consumer, one message at a time)."""
    starts = sorted(r["t"] for r in read_records(record_path, "start"))
    ends = sorted(r["t"] for r in read_records(record_path, "end"))
    return [start - end for end, start in zip(ends, starts[1:])]


def test_the_next_batch_is_received_while_the_last_message_runs(
        queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    """A receive takes at least the proxy's delay, so a message that starts sooner than that after the one
    before it ended was received while that one ran."""
    proxy.delay_s = 0.5
    for i in range(3):
        queue.send_message(json.dumps({"sleep": 1.0, "n": i}))
    # One message per batch; 2.5 s of prefetch fits the running one and one more (1 s each).
    runtime = runtimes(settings_via(proxy, queue_name, batch_size=1, prefetch_s=2.5))
    wait_until(lambda: runtime.stats()["succeeded"] == 3, 30, what="all three messages")
    first, second = gaps_between_messages(record_path)
    assert first >= proxy.delay_s  # the first run teaches the handler's duration: nothing received ahead yet
    assert second < proxy.delay_s, second  # the third was received while the second ran


def test_no_receive_ahead_beyond_the_prefetch_budget(
        queue: QueueClient, queue_name: str, proxy: FaultProxy, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    proxy.delay_s = 0.5
    for i in range(3):
        queue.send_message(json.dumps({"sleep": 1.0, "n": i}))
    runtime = runtimes(settings_via(proxy, queue_name, batch_size=1, prefetch_s=1.5))  # room for one message only
    wait_until(lambda: runtime.stats()["succeeded"] == 3, 30, what="all three messages")
    assert all(gap >= proxy.delay_s for gap in gaps_between_messages(record_path))


# -- pure logic ------------------------------------------------------------------------------------


def test_ahead_count_waits_for_the_last_round_trip_and_keeps_to_the_budget() -> None:
    consumer = Consumer.__new__(Consumer)
    consumer.settings = QueueSettings(connection_string="x", batch_size=32, prefetch_s=2.0)
    consumer.handler_s, consumer.receive_s = None, 0.015
    assert consumer.ahead_count(1) == 0  # duration unknown: the first message teaches it
    consumer.handler_s = 0.020
    assert consumer.ahead_count(10) == 0  # 200 ms of work left: too early
    assert consumer.ahead_count(1) == 32  # the last one: capped by batch_size (2 s / 20 ms = 100)
    consumer.handler_s = 0.0005
    assert consumer.ahead_count(32) == 32  # 16 ms of work left, about one round trip: now
    consumer.handler_s = 0.5
    assert consumer.ahead_count(1) == 3  # 4 fit in 2 s, one of them still running
    consumer.handler_s = 1.5
    assert consumer.ahead_count(1) == 0  # two would not fit
    consumer.settings = QueueSettings(connection_string="x", batch_size=7, prefetch_s=0)
    assert consumer.ahead_count(1) == 7  # prefetch off: always batch_size


def test_settler_blocks_submitters_beyond_its_bound_and_waits_for_outstanding_calls() -> None:
    settler = Settler(2)
    release = threading.Event()
    for _ in range(2):
        settler.submit(release.wait)
    third = threading.Thread(target=settler.submit, args=(lambda: None,))
    third.start()
    third.join(0.2)
    assert third.is_alive() and settler.outstanding == 2  # back-pressure: the third waits for a slot
    assert not settler.wait(0.05)
    release.set()
    third.join(5)
    assert settler.wait(5) and settler.outstanding == 0 and settler.peak == 2
    settler.close()


def test_a_closed_settler_runs_late_calls_on_the_callers_thread() -> None:
    settler = Settler(1)
    settler.close()
    ran_on: list[str] = []
    settler.submit(lambda: ran_on.append(threading.current_thread().name))
    assert ran_on == [threading.current_thread().name] and settler.outstanding == 0
