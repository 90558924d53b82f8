"""The worker against a real Azurite: delivery, retries, poison, leases, checkpoints, drain, signals.

In-process WorkerRuntime where only the message lifecycle matters; a real
`python -m worker` process where processes and signals do. The handler is
testsupport/handlers.py:record, steered by the message body.
"""

from __future__ import annotations

import base64
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import (
    QueueClient,
)

from testsupport.azurite import Azurite
from testsupport.handlers import RECORD_ENV, read_records
from testsupport.harness import RECORD_HANDLER, REPO, child_env, worker_settings
from testsupport.queues import b64_client, message_count, peek_opened, peek_texts, poisoned_originals
from testsupport.requestlog import RequestLog
from testsupport.waiting import wait_until
from worker.message import Codec, Envelope
from worker.queue.client import make_queue_client
from worker.queue.consumer import Consumer, Shared, release_pending
from worker.queue.lease import Lease
from worker.queue.poisoned import read_poisoned
from worker.runtime import WorkerRuntime
from worker.settings import (
    QueueSettings,
)
from worker.telemetry.providers import Telemetry

HANDLER = RECORD_HANDLER


# -- fixtures and helpers -------------------------------------------------------------------------




def by_id(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        grouped.setdefault(r["id"], []).append(r)
    for attempts in grouped.values():
        attempts.sort(key=lambda r: r["t"])
    return grouped


def worker_config(tmp_path: Path, queue_name: str, **queue: Any) -> Path:
    values = {"name": queue_name, "visibility_timeout_s": 2, "idle_poll_max_s": 0.2, "retry_delay_s": 1.0, **queue}
    lines = ["[queue]", *(f"{k} = {json.dumps(v)}" for k, v in values.items()),
             "[workload]", f'handler = "{HANDLER}"',
             "[events]", 'source = "none"', 'endpoint = "http://127.0.0.1:9"',
             "[shutdown]", "drain_timeout_s = 10.0"]
    path = tmp_path / f"worker-{queue_name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def worker_process(azurite: Azurite, config: Path, record: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    env = child_env(azurite)
    env[RECORD_ENV] = str(record)
    with log.open("ab") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "worker", "--config", str(config)], env=env, cwd=REPO,
                                stdout=fh, stderr=fh)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- delivery ------------------------------------------------------------------------------------


def test_success_deletes_the_message(azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
                                     runtimes: Callable[..., WorkerRuntime]) -> None:
    sent = queue.send_message("hello wörld ✓")
    runtime = runtimes(worker_settings(azurite, queue_name))

    ends = wait_until(lambda: read_records(record_path, "end"), 10, what="the handler to finish")
    wait_until(lambda: runtime.stats()["succeeded"] == 1, 5, what="the delete")
    [start] = read_records(record_path, "start")
    assert start["id"] == sent.id
    assert start["body"] == "hello wörld ✓"
    assert start["dequeue_count"] == 1
    assert start["state"] is None
    assert datetime.fromisoformat(start["inserted_on"]) == sent.inserted_on
    assert [e["outcome"] for e in ends] == ["succeeded"]
    assert message_count(queue) == 0
    assert runtime.stats()["held"] == 0


def test_failures_retry_with_growing_delay_then_poison_the_original(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    plain_body = json.dumps({"fail": True})
    checkpointed_body = json.dumps({"fail": True, "checkpoint": {"done": 1}})
    plain = queue.send_message(plain_body)
    checkpointed = queue.send_message(checkpointed_body)
    poison = azurite.queue(f"{queue_name}-poison")
    runtime = runtimes(worker_settings(azurite, queue_name, max_dequeue_count=3, retry_delay_s=1.0))

    wait_until(lambda: len(peek_texts(poison)) == 2, 15, what="both messages in the poison queue")
    assert sorted(poisoned_originals(poison)) == sorted([plain_body, checkpointed_body])  # the originals, no envelope
    notes = {note.message_id: note for note in (read_poisoned(t)[1] for t in peek_texts(poison)) if note is not None}
    assert set(notes) == {plain.id, checkpointed.id}
    why = "handler failed 3 times (max_dequeue_count 3); last: RuntimeError: failing on purpose (attempt 3)"
    assert {(n.reason, n.dequeue_count) for n in notes.values()} == {(why, 3)}
    assert notes[plain.id].inserted_on is not None and plain.inserted_on is not None
    assert datetime.fromisoformat(notes[plain.id].inserted_on) == plain.inserted_on
    assert message_count(queue) == 0
    assert message_count(poison) == 2
    attempts = by_id(read_records(record_path, "start"))
    assert set(attempts) == {plain.id, checkpointed.id}
    for message_id, starts in attempts.items():
        assert [s["dequeue_count"] for s in starts] == [1, 2, 3], message_id
        gap1, gap2 = starts[1]["t"] - starts[0]["t"], starts[2]["t"] - starts[1]["t"]
        assert 0.9 <= gap1 < 1.8, (message_id, gap1, gap2)  # retry_delay_s x 2^0
        assert gap2 >= 1.8 and gap2 > gap1 + 0.5, (message_id, gap1, gap2)  # retry_delay_s x 2^1
    assert [s["state"] for s in attempts[checkpointed.id]] == [None, {"done": 1}, {"done": 1}]
    stats = runtime.stats()
    assert (stats["failed"], stats["poisoned"]) == (4, 2)


def test_lease_is_renewed_while_a_long_handler_runs(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                    record_path: Path, runtimes: Callable[..., WorkerRuntime]) -> None:
    long = queue.send_message(json.dumps({"sleep": 6}))
    waiting = queue.send_message("received in the same batch, waits 6 s to start")
    # Two consumer threads: the idle one would receive a message again if its lease ever ran out,
    # the running one's or that of the one waiting its turn in the batch.
    runtime = runtimes(worker_settings(azurite, queue_name, visibility_timeout_s=2, prefetch_s=0), threads=2)

    wait_until(lambda: runtime.stats()["succeeded"] == 2, 12, what="both messages to succeed")
    starts = by_id(read_records(record_path, "start"))
    assert [s["dequeue_count"] for s in starts[long.id]] == [1]
    assert [s["dequeue_count"] for s in starts[waiting.id]] == [1]
    [long_end] = [e for e in read_records(record_path, "end") if e["id"] == long.id]
    assert starts[waiting.id][0]["t"] >= long_end["t"]  # held (renewed) for the whole run, not re-delivered
    assert runtime.stats()["lease_lost"] == 0
    assert message_count(queue) == 0


def test_sigkill_mid_handler_loses_nothing_and_resumes_from_checkpoint(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path) -> None:
    body = json.dumps({"steps": 10, "step_s": 0.2})
    sent = queue.send_message(body)
    config = worker_config(tmp_path, queue_name, visibility_timeout_s=2)
    record, log = tmp_path / "attempts.jsonl", tmp_path / "worker.log"

    with worker_process(azurite, config, record, log) as first:
        checkpoints = wait_until(lambda: [c for c in read_records(record, "checkpoint") if c["state"]["step"] >= 3], 20,
                               what="three checkpoints")
        first.send_signal(signal.SIGKILL)
        assert first.wait(5) == -signal.SIGKILL
    last_seen = max(c["state"]["step"] for c in read_records(record, "checkpoint"))
    assert checkpoints and last_seen < 10

    with worker_process(azurite, config, record, log) as second:
        ends = wait_until(lambda: [e for e in read_records(record, "end") if e["pid"] == second.pid], 20,
                        what="the second process to finish the message")
        wait_until(lambda: message_count(queue) == 0, 5, what="the delete")
    starts = read_records(record, "start")
    assert [s["pid"] for s in starts] == [first.pid, second.pid], log.read_text()
    resumed = starts[1]
    assert resumed["id"] == sent.id
    assert resumed["body"] == body  # the original, not the envelope
    assert resumed["dequeue_count"] == 2
    # The kill may land between a stored checkpoint and its record line: at most one step ahead.
    assert resumed["state"]["step"] in (last_seen, last_seen + 1)
    assert [e["outcome"] for e in ends] == ["succeeded"]
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


# -- drain and release ---------------------------------------------------------------------------


def test_drain_releases_unstarted_messages_at_once(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                   record_path: Path, tmp_path: Path,
                                                   runtimes: Callable[..., WorkerRuntime]) -> None:
    go = tmp_path / "go"
    bodies = [json.dumps({"wait_file": str(go), "ignore_drain": True, "n": i}) for i in range(10)]
    for body in bodies:
        queue.send_message(body)
    runtime = runtimes(worker_settings(azurite, queue_name, batch_size=32, prefetch_s=0, visibility_timeout_s=30))
    [running] = wait_until(lambda: read_records(record_path, "start"), 10, what="the first handler to start")
    wait_until(lambda: runtime.stats()["held"] == 10, 5, what="the whole batch to be held")

    began = time.monotonic()
    runtime.stop_receiving(time.time() + 30)
    wait_until(lambda: len(peek_texts(queue)) == 9, 1.0, interval=0.01,
               what="the 9 unstarted messages to be visible again")
    assert time.monotonic() - began <= 1.0
    opened = peek_opened(queue)
    assert sorted(body for _, body in opened) == sorted(b for b in bodies if b != running["body"])
    assert {envelope.releases for envelope, _ in opened} == {1}  # counted as releases, not failures
    assert not runtime.idle()  # the running handler still holds its message

    go.touch()
    wait_until(runtime.idle, 5, what="the running handler to finish")
    assert len(read_records(record_path, "start")) == 1
    assert message_count(queue) == 9
    assert runtime.stats()["released"] == 9 and runtime.stats()["succeeded"] == 1


def test_releases_and_interruptions_never_poison(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                 record_path: Path, runtimes: Callable[..., WorkerRuntime]) -> None:
    # Outside a drain an interruption is given back after 1 s, then 2 s (see test_interrupted_outside_a_drain...).
    body = json.dumps({"checkpoint": {"kept": True}, "interrupt_until": 2, "fail_until": 3})
    queue.send_message(body)
    runtimes(worker_settings(azurite, queue_name, max_dequeue_count=2))

    wait_until(lambda: [e for e in read_records(record_path, "end") if e["outcome"] == "succeeded"], 25,
             what="the fourth attempt to succeed")
    wait_until(lambda: message_count(queue) == 0, 5, what="the delete")
    ends = read_records(record_path, "end")
    assert [e["outcome"] for e in ends] == ["interrupted"] * 2 + ["failed", "succeeded"]
    starts = read_records(record_path, "start")
    assert [s["dequeue_count"] for s in starts] == [1, 2, 3, 4]
    assert [s["state"] for s in starts] == [None] + [{"kept": True}] * 3
    assert {s["body"] for s in starts} == {body}
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


# -- encoding and checkpoints --------------------------------------------------------------------


def test_base64_messages_checkpoints_and_undecodable_poison(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                            record_path: Path,
                                                            runtimes: Callable[..., WorkerRuntime]) -> None:
    sdk = b64_client(azurite, queue_name)
    text = "grüße, 日本語 ✓ 🚀"
    checkpointed = json.dumps({"checkpoint": {"k": "välue ✓"}, "interrupt_until": 1, "fail": True}, ensure_ascii=False)
    sdk.send_message(text)
    sdk.send_message(checkpointed)
    queue.send_message("not base64 at all!")
    queue.send_message(base64.b64encode(b"\xff\xfe not utf-8").decode("ascii"))
    raw = peek_texts(queue)  # the queue text exactly as written
    assert [Codec("base64").decode_text(t) for t in raw[:2]] == [text, checkpointed]
    assert raw[2:] == ["not base64 at all!", base64.b64encode(b"\xff\xfe not utf-8").decode("ascii")]
    poison = azurite.queue(f"{queue_name}-poison")

    runtime = runtimes(worker_settings(azurite, queue_name, message_encoding="base64", max_dequeue_count=1))
    wait_until(lambda: len(peek_texts(poison)) == 3, 10, what="two undecodable and one failed message in poison")
    wait_until(lambda: message_count(queue) == 0, 5, what="the delete")

    starts = read_records(record_path, "start")
    assert {s["body"] for s in starts} == {text, checkpointed}  # the undecodable ones never reached the handler
    resumed = [s for s in starts if s["body"] == checkpointed and s["dequeue_count"] == 2]
    assert [s["state"] for s in resumed] == [{"k": "välue ✓"}]  # checkpoint round-tripped through base64
    assert sorted(poisoned_originals(poison)) == sorted(raw[1:])
    reasons = sorted(note.reason for note in (read_poisoned(t)[1] for t in peek_texts(poison)) if note is not None)
    assert [r.partition(";")[0].partition(":")[0] for r in reasons] == [
        "handler failed 1 times (max_dequeue_count 1)", "undecodable (base64)", "undecodable (base64)"], reasons
    assert runtime.stats()["poisoned"] == 3 and runtime.stats()["succeeded"] == 1


@pytest.mark.parametrize(("encoding", "size"), [("none", 70_000), ("base64", 50_000)])
def test_checkpoint_over_64k_raises_and_changes_nothing(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                        record_path: Path, runtimes: Callable[..., WorkerRuntime],
                                                        encoding: str, size: int) -> None:
    # 50 000 characters fit in 64 KiB as text, but not once base64-encoded.
    body = json.dumps({"checkpoint": {"n": 1}, "big_checkpoint": size, "interrupt_until": 1})
    (b64_client(azurite, queue_name) if encoding == "base64" else queue).send_message(body)
    runtimes(worker_settings(azurite, queue_name, message_encoding=encoding))

    wait_until(lambda: [e for e in read_records(record_path, "end") if e["outcome"] == "succeeded"], 10,
             what="the second attempt")
    events = [r["event"] for r in read_records(record_path) if r["dequeue_count"] == 1]
    assert events == ["start", "checkpoint", "too_large", "end"]
    assert "65536" in read_records(record_path, "too_large")[0]["error"]
    starts = read_records(record_path, "start")
    assert [s["state"] for s in starts] == [None, {"n": 1}]
    assert starts[1]["body"] == body


# -- lease loss ----------------------------------------------------------------------------------


def test_lost_lease_is_logged_and_the_worker_goes_on(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                     record_path: Path, tmp_path: Path,
                                                     runtimes: Callable[..., WorkerRuntime],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="worker")
    runtime = runtimes(worker_settings(azurite, queue_name, batch_size=1))

    # 1. Another client deletes the message (here: clears the queue) while the handler runs: the delete finds nothing.
    deleted_go = tmp_path / "deleted-go"
    queue.send_message(json.dumps({"wait_file": str(deleted_go)}))
    wait_until(lambda: read_records(record_path, "start"), 10, what="the first handler")
    queue.clear_messages()
    deleted_go.touch()
    wait_until(lambda: runtime.stats()["lease_lost"] == 1, 5, what="the lost delete")

    # 2. Another consumer updates the message (new pop receipt) while the handler runs: its checkpoint is refused.
    updated_go = tmp_path / "updated-go"
    updated = queue.send_message(json.dumps({"wait_file": str(updated_go), "after_wait_checkpoint": {"x": 1}}))
    start = wait_until(lambda: [s for s in read_records(record_path, "start") if s["id"] == updated.id], 10,
                     what="the second handler")[0]
    queue.update_message(updated.id, start["receipt"], content="taken by someone else", visibility_timeout=60)
    updated_go.touch()
    wait_until(lambda: runtime.stats()["lease_lost"] == 2, 5, what="the refused checkpoint")
    [refused] = [c for c in read_records(record_path, "checkpoint") if c["id"] == updated.id]
    assert refused["stored"] is False

    # 3. The same worker still processes new messages.
    after = queue.send_message("after")
    wait_until(lambda: runtime.stats()["succeeded"] == 1, 10, what="a later message to succeed")
    assert [s["id"] for s in read_records(record_path, "start")][-1] == after.id
    assert all(t.is_alive() for t in runtime.consumer_threads)
    lost = [r for r in caplog.records if "lease lost" in r.getMessage()]
    assert len(lost) == 2, caplog.text
    assert message_count(queue) == 1  # the message another client took is left to it
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


# -- idle polling --------------------------------------------------------------------------------


def test_empty_queue_polls_back_off_and_drain_wakes_an_idle_worker(azurite: Azurite, queue: QueueClient,
                                                                   queue_name: str, record_path: Path,
                                                                   runtimes: Callable[..., WorkerRuntime]) -> None:
    with RequestLog().installed() as requests:
        runtime = runtimes(worker_settings(azurite, queue_name, idle_poll_max_s=2.0))
        time.sleep(3.0)  # the measurement window
        polls = [t for t, _, url in requests.matching("GET", f"/{queue_name}/messages")]
    # Without backoff (50 ms) that would be ~60 polls; with it, 0.05 s doubling up to 2 s (jittered): 5 to 10.
    assert 4 <= len(polls) <= 12, len(polls)
    gaps = [b - a for a, b in zip(polls, polls[1:])]
    assert gaps[0] < 0.15 and max(gaps) >= 0.35 and max(gaps) <= 2.3, gaps

    began = time.monotonic()
    runtime.stop_receiving(time.time() + 30)
    wait_until(lambda: not any(t.is_alive() for t in runtime.consumer_threads), 0.2, interval=0.005,
             what="the sleeping consumer to wake and stop")
    assert runtime.idle()
    assert time.monotonic() - began <= 0.25


# -- standalone worker process and signals --------------------------------------------------------


def test_sigterm_drains_and_exits_0_leaving_unprocessed_messages(azurite: Azurite, queue: QueueClient,
                                                                 queue_name: str, tmp_path: Path) -> None:
    bodies = [json.dumps({"sleep": 30, "n": i}) for i in range(5)]  # a drain interrupts the running one
    for body in bodies:
        queue.send_message(body)
    config = worker_config(tmp_path, queue_name, visibility_timeout_s=30)
    record, log = tmp_path / "attempts.jsonl", tmp_path / "worker.log"

    with worker_process(azurite, config, record, log) as proc:
        wait_until(lambda: read_records(record, "start"), 20, what="a handler to start")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
        assert time.monotonic() - began < 5
    opened = peek_opened(queue)  # every one visible now, not after its 30 s lease
    assert sorted(body for _, body in opened) == sorted(bodies)
    assert [e["outcome"] for e in read_records(record, "end")] == ["interrupted"]
    assert "SIGTERM" in log.read_text()


def test_sigquit_releases_at_once_and_exits(azurite: Azurite, queue: QueueClient, queue_name: str,
                                            tmp_path: Path) -> None:
    bodies = [json.dumps({"checkpoint": {"n": 1}, "sleep": 30, "ignore_drain": True, "n": i}) for i in range(5)]
    for body in bodies:
        queue.send_message(body)
    config = worker_config(tmp_path, queue_name, visibility_timeout_s=30)
    record, log = tmp_path / "attempts.jsonl", tmp_path / "worker.log"

    with worker_process(azurite, config, record, log) as proc:
        wait_until(lambda: read_records(record, "checkpoint"), 20, what="a handler to checkpoint")
        began = time.monotonic()
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(10) == 0, log.read_text()
        assert time.monotonic() - began < 3  # not after the 30 s handler, nor the 10 s drain timeout
    opened = peek_opened(queue)
    assert sorted(body for _, body in opened) == sorted(bodies)
    [running] = read_records(record, "start")
    [(held, _)] = [(envelope, body) for envelope, body in opened if body == running["body"]]
    assert (held.state, held.releases) == ({"n": 1}, 1)  # checkpoint kept, counted as a release
    assert read_records(record, "end") == []


def test_prefetch_leaves_slow_work_to_other_vms(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                runtimes: Callable[..., WorkerRuntime]) -> None:
    """Two workers (think: two VMs) on one queue of slow messages: neither sits on a whole batch."""
    for _ in range(8):
        queue.send_message(json.dumps({"sleep": 0.4}))
    settings = worker_settings(azurite, queue_name, prefetch_s=0.5)
    first = runtimes(settings)
    wait_until(lambda: first.stats()["succeeded"] >= 1, 10, what="the first worker to learn the handler's duration")
    second = runtimes(settings)
    wait_until(lambda: first.stats()["succeeded"] + second.stats()["succeeded"] == 8, 20, what="all messages done")
    assert second.stats()["succeeded"] >= 2, (first.stats(), second.stats())


def test_receive_count_follows_the_handler_duration() -> None:
    settings = QueueSettings(connection_string="UseDevelopmentStorage=true", batch_size=32, prefetch_s=2.0)
    consumer = Consumer.__new__(Consumer)
    consumer.settings, consumer.handler_s = settings, None
    assert consumer.receive_count() == 1  # nothing known yet: one
    consumer.observe_duration(0.001)
    assert consumer.receive_count() == 32  # capped by batch_size
    consumer.handler_s = 0.2
    assert consumer.receive_count() == 10
    consumer.handler_s = 600.0
    assert consumer.receive_count() == 1
    consumer.settings = QueueSettings(connection_string="x", batch_size=7, prefetch_s=0)
    assert consumer.receive_count() == 7  # prefetch off


def test_a_handler_calling_sys_exit_fails_the_message_not_the_consumer(
        azurite: Azurite, queue: QueueClient, queue_name: str, runtimes: Callable[..., WorkerRuntime]) -> None:
    queue.send_message(json.dumps({"exit": 3}))
    runtime = runtimes(worker_settings(azurite, queue_name, max_dequeue_count=1))
    poison = azurite.queue(f"{queue_name}-poison")
    wait_until(lambda: runtime.stats()["poisoned"] == 1, 10, what="the message to be poisoned")
    assert poisoned_originals(poison) == [json.dumps({"exit": 3})]
    queue.send_message(json.dumps({"n": 1}))
    wait_until(lambda: runtime.stats()["succeeded"] == 1, 10, what="the same consumer to go on")
    assert not runtime.crashed()


def test_a_release_that_fails_drops_the_lease_so_a_drain_is_not_held_up(
        azurite: Azurite, queue: QueueClient, queue_name: str, telemetry: Telemetry) -> None:
    queue.send_message("held")
    [received] = list(queue.receive_messages(max_messages=1, visibility_timeout=30))
    settings = worker_settings(azurite, queue_name).queue
    shared = Shared(settings, lambda m, c: None, telemetry, Codec("none"))
    stale = Lease(make_queue_client(settings), shared.codec, received.id, "not-the-pop-receipt", Envelope("held"), 30)
    shared.leases.add(stale)
    assert release_pending(shared) == 0  # the service refuses: PopReceiptMismatch
    assert len(shared.leases) == 0, "a lost lease stayed in the table: idle() would wait for the deadline"
