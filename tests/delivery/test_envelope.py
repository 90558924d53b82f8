"""The envelope against hostile, damaged, large and old messages (issue 16, defects 2, 5 and 10), on a real Azurite.

Producer text never sets the bookkeeping; a message that cannot be opened is
poisoned alone; releases of large and non-ASCII messages are recorded; an
interruption outside a drain is given back after a growing delay.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.handlers import read_records
from testsupport.harness import worker_settings
from testsupport.queues import b64_client, message_count, peek_texts, poisoned_originals
from testsupport.waiting import wait_until
from worker.message import (
    ENVELOPE_MARKER,
    LEGACY_ENVELOPE_PREFIX,
    MAX_MESSAGE_BYTES,
    Codec,
    Envelope,
    UndecodableMessage,
    text_size,
)
from worker.queue.poisoned import read_poisoned
from worker.runtime import WorkerRuntime


def succeeded(record: Path) -> list[dict[str, object]]:
    return [e for e in read_records(record, "end") if e["outcome"] == "succeeded"]


def legacy_envelope(original: str, releases: int, state: object) -> str:
    """What version 1 wrote (and what a producer could forge, since it trusted the prefix)."""
    return LEGACY_ENVELOPE_PREFIX + json.dumps({"original": original, "releases": releases, "state": state},
                                               separators=(",", ":"))[1:]


# -- defect 2: forged and damaged envelopes -------------------------------------------------------


def test_producer_text_cannot_forge_releases_or_a_checkpoint(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                             record_path: Path,
                                                             runtimes: Callable[..., WorkerRuntime]) -> None:
    # Version 1's envelope with a huge release count and a forged checkpoint: before the fix it was never
    # poisoned however often it failed, and the handler resumed from the forged state.
    forged_v1 = legacy_envelope(json.dumps({"fail": True}), 1000, {"step": 99})
    # The current form, but naming an id the producer made up: plain producer text, delivered untouched.
    forged_v2 = f'{ENVELOPE_MARKER} {uuid.uuid4()} {{"releases":1000,"state":{{"step":99}}}}\n{{"fail":true}}'
    v1 = queue.send_message(forged_v1)
    v2 = queue.send_message(forged_v2)
    poison = azurite.queue(f"{queue_name}-poison")
    runtimes(worker_settings(azurite, queue_name, max_dequeue_count=2))

    wait_until(lambda: len(peek_texts(poison)) == 1, 15, what="the forged version-1 message to be poisoned")
    wait_until(lambda: succeeded(record_path), 10, what="the forged current-form message to be handled")
    starts = read_records(record_path, "start")
    assert {s["state"] for s in starts if s["id"] == v1.id} == {None}  # the forged checkpoint was dropped
    assert [s["dequeue_count"] for s in starts if s["id"] == v1.id] == [1, 2]  # poisoned after 2 failures
    assert poisoned_originals(poison) == [json.dumps({"fail": True})]  # the version-1 original, unwrapped
    [v2_start] = [s for s in starts if s["id"] == v2.id]
    assert (v2_start["body"], v2_start["state"]) == (forged_v2, None)  # the producer's text, as it sent it
    wait_until(lambda: message_count(queue) == 0, 5, what="the queue to empty")


def test_a_message_that_cannot_be_opened_is_poisoned_alone(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                           record_path: Path,
                                                           runtimes: Callable[..., WorkerRuntime]) -> None:
    # The reported one: version 1's prefix, then 3,000 nested brackets (RecursionError in json.loads). Before the
    # fix it sent the whole batch back unprocessed on every cycle until the healthy ones were poisoned.
    # An envelope in the current form naming the message's own id, with a damaged header: only a
    # writer with access to the queue could make it, and it is poisoned with the reason.
    damaged = queue.send_message("placeholder")
    [received] = queue.receive_messages(max_messages=1, visibility_timeout=1)
    bad_header = f"{ENVELOPE_MARKER} {damaged.id} {{\"releases\":1,\"state\":{'[' * 3000}\nbody"
    queue.update_message(damaged.id, received.pop_receipt, content=bad_header, visibility_timeout=0)
    deep = LEGACY_ENVELOPE_PREFIX + '"original":"x","state":' + "[" * 3000
    queue.send_message(deep)
    healthy = [queue.send_message(json.dumps({"n": i})).id for i in range(5)]
    poison = azurite.queue(f"{queue_name}-poison")
    runtime = runtimes(worker_settings(azurite, queue_name, batch_size=32, prefetch_s=0))

    wait_until(lambda: len(succeeded(record_path)) == 6, 15, what="the healthy messages and the deep one to run")
    wait_until(lambda: poisoned_originals(poison) == [bad_header], 5, what="the damaged envelope in poison")
    [note] = [read_poisoned(t)[1] for t in peek_texts(poison)]
    assert note is not None and "damaged envelope header" in note.reason
    starts = read_records(record_path, "start")
    assert {s["id"]: s["dequeue_count"] for s in starts if s["id"] in healthy} == dict.fromkeys(healthy, 1)
    assert [s["body"] for s in starts if s["body"] == deep] == [deep]  # not an envelope: the producer's body
    assert runtime.stats()["poisoned"] == 1
    wait_until(lambda: message_count(queue) == 0, 5, what="the queue to empty")


def test_version_1_envelopes_are_unwrapped_on_upgrade(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                      record_path: Path,
                                                      runtimes: Callable[..., WorkerRuntime]) -> None:
    # Left in the queue by version 1 after 3 attempts: its checkpoint and count cannot be told from a forgery.
    body = json.dumps({"fail": True})
    sent = queue.send_message(legacy_envelope(body, 2, {"step": 3}))
    for _ in range(3):  # three earlier deliveries
        [m] = queue.receive_messages(max_messages=1, visibility_timeout=1)
        queue.update_message(m.id, m.pop_receipt, visibility_timeout=0)
    poison = azurite.queue(f"{queue_name}-poison")
    runtimes(worker_settings(azurite, queue_name, max_dequeue_count=2))

    wait_until(lambda: poisoned_originals(poison) == [body], 15, what="the unwrapped original in poison")
    starts = [s for s in read_records(record_path, "start") if s["id"] == sent.id]
    # Earlier attempts forgiven once (not counted as failures), then two failures of its own: poisoned.
    assert [(s["dequeue_count"], s["body"], s["state"]) for s in starts] == [(4, body, None), (5, body, None)]


# -- defect 5: releases of large and non-ASCII messages ------------------------------------------


@pytest.mark.parametrize(("encoding", "pad"), [("none", "é" * 22_000), ("base64", "x" * 40_000)])
def test_releases_of_large_and_non_ascii_messages_are_recorded(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                               record_path: Path,
                                                               runtimes: Callable[..., WorkerRuntime],
                                                               encoding: str, pad: str) -> None:
    # Before the fix the envelope escaped é to 6 bytes (> 64 KiB), and base64 mode encoded the base64 text
    # twice: the release went unrecorded and counted as a failure, so max_dequeue_count 1 poisoned it.
    body = json.dumps({"checkpoint": {"k": "é"}, "interrupt_until": 2, "pad": pad}, ensure_ascii=False)
    (b64_client(azurite, queue_name) if encoding == "base64" else queue).send_message(body)
    runtimes(worker_settings(azurite, queue_name, max_dequeue_count=1, message_encoding=encoding))

    wait_until(lambda: succeeded(record_path), 25, what="the third attempt to succeed")
    starts = read_records(record_path, "start")
    assert [(s["dequeue_count"], s["state"], s["body"] == body) for s in starts] == [
        (1, None, True), (2, {"k": "é"}, True), (3, {"k": "é"}, True)]
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


def test_a_message_with_no_room_for_the_header_is_released_as_a_fresh_copy(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    spec = json.dumps({"interrupt_until": 1, "pad": ""})
    body = spec[:-2] + "y" * (MAX_MESSAGE_BYTES - 20 - len(spec)) + spec[-2:]  # a few bytes under the limit
    first = queue.send_message(body)
    runtimes(worker_settings(azurite, queue_name, max_dequeue_count=1))

    starts = wait_until(lambda: len(read_records(record_path, "start")) >= 2 and read_records(record_path, "start"), 15,
                        what="the copy to be received")
    # Its release could not be recorded, so it was not counted as a failure (max_dequeue_count 1): a fresh copy
    # of the original replaced it.
    assert starts[0]["id"] == first.id and starts[1]["id"] != first.id
    assert [(s["dequeue_count"], s["body"] == body) for s in starts[:2]] == [(1, True), (1, True)]
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []


# -- defect 10 (worker part): Interrupted outside a drain ----------------------------------------


def test_interrupted_outside_a_drain_is_given_back_after_a_growing_delay(
        azurite: Azurite, queue: QueueClient, queue_name: str, record_path: Path,
        runtimes: Callable[..., WorkerRuntime]) -> None:
    queue.send_message(json.dumps({"interrupt_until": 3}))
    runtime = runtimes(worker_settings(azurite, queue_name))

    wait_until(lambda: succeeded(record_path), 25, what="the fourth attempt to succeed")
    starts = [s["t"] for s in read_records(record_path, "start")]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:])]
    # Before the fix: back at once, ~50 times a second. Now invisible for 1, 2, then 4 s (the queue's
    # visibility timeout enforces these lower bounds; nothing here depends on this machine's speed).
    assert len(starts) == 4
    assert [g >= 0.9 * d for g, d in zip(gaps, (1, 2, 4))] == [True] * 3, gaps
    assert runtime.stats()["interrupted"] == 3


# -- the codec on its own ------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["none", "base64"])
def test_an_envelope_is_its_body_plus_a_small_header(encoding: str) -> None:
    codec = Codec(encoding)
    for payload in ["é" * 22_000, "x" * 40_000, "line one\nline two \"quoted\" \\ 🚀", ""]:
        original = codec.encode_text(payload)
        envelope = Envelope(original, {"step": 3, "note": "välue"}, 7)
        sealed = codec.seal(envelope, "1f2e-id")
        assert text_size(sealed) <= text_size(original) + (200 if encoding == "none" else 270)
        assert codec.open(sealed, "1f2e-id") == (envelope, payload)
        # The same text received under another id is the producer's, not ours.
        assert codec.open(sealed, "other-id") == (Envelope(sealed), codec.decode_text(sealed))


def test_a_damaged_own_header_is_undecodable() -> None:
    codec = Codec("none")
    for header in ['{"releases":-1,"state":null}', '{"releases":true,"state":null}', '{"releases":1}',
                   '{"releases":1,"state":null,"extra":1}', "[" * 5000, '{"releases":1,"state":' + "[" * 70 + "]" * 70 + "}"]:
        with pytest.raises(UndecodableMessage):
            codec.open(f"{ENVELOPE_MARKER} id-1 {header}\nbody", "id-1")
    with pytest.raises(UndecodableMessage):
        codec.open(f"{ENVELOPE_MARKER} id-1 {{\"releases\":1,\"state\":null}}", "id-1")  # no end of header
