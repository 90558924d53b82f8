"""Hostile JSON, everywhere the package parses JSON it did not write: each bad document (or bad part of
one) fails alone, with one line, never a traceback and never hiding the good parts beside it."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
from azure.storage.queue import QueueClient

from supervisor.events.azure import parse_document
from supervisor.ops.prices import PricesError, fetch_quote, read_cached
from supervisor.simulator.server import ImdsSimulator
from supervisor.vm.imds import ImdsError, fetch_instance_info, parse_instance
from testsupport.harness import Supervisor
from testsupport.hostile.documents import BROKEN_TEXTS, HOSTILE_VALUES, deep_array, event_text, events_document, huge_string
from testsupport.hostile.prices import Answer, HostilePrices
from worker.common import jsonsafe
from worker.control import Channel
from worker.message import Codec, UndecodableMessage, parse_header
from worker.programs.files import CheckpointFile
from worker.queue.poisoned import poisoned_text, read_poisoned

OURS = "vm-spot-07"


# -- Scheduled Events ----------------------------------------------------------------------------


def test_a_deeply_nested_neighbour_event_never_hides_our_preempt_end_to_end(
        start_evictable: Callable[..., Supervisor], simulator: ImdsSimulator, queue: QueueClient) -> None:
    """Issue 21, high 6: thousands of nested arrays in a neighbour's event made the whole document unreadable
    on every poll (RecursionError, a traceback each time) and our own Preempt was never drained."""
    neighbour = event_text("neighbour-event", ["vm-other"], Resources=deep_array())
    assert simulator.add_verbatim_event(neighbour)["verbatim_events"] == 1
    notice = simulator.simulate_eviction(delay_s=30)
    sup = start_evictable(scaling_workers="1")
    assert sup.stop_when_holding(notice["EventId"], timeout=30) == 0
    log = sup.log()
    assert "Traceback" not in log
    skipped = [line for line in log.splitlines() if "event skipped" in line]
    assert len(skipped) == 1, skipped  # once, although it was polled many times
    assert "neighbour-event" in skipped[0] and len(skipped[0]) < 400
    assert [a["body"] for a in simulator.acks()] == [{"StartRequests": [{"EventId": notice["EventId"]}]}]


@pytest.mark.parametrize("field", ["EventId", "Resources", "EventType", "EventStatus", "NotBefore", "Description",
                                   "EventSource", "DurationInSeconds"])
@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_any_hostile_field_of_a_neighbour_event_leaves_ours_readable(field: str, hostile: str) -> None:
    neighbour = event_text("neighbour", ["vm-other"], **{field: HOSTILE_VALUES[hostile]})
    ours = event_text("ours", [OURS])
    document = parse_document(events_document(neighbour, ours, neighbour))
    assert [e.event_id for e in document.events if OURS in e.resources] == ["ours"]
    assert all(len(problem) < 400 and "\n" not in problem for problem in document.problems)


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_item_in_events_is_skipped_alone(hostile: str) -> None:
    document = parse_document(events_document(HOSTILE_VALUES[hostile], event_text("ours", [OURS])))
    assert [e.event_id for e in document.events] == ["ours"]
    assert len(document.problems) == 1 and "event skipped" in document.problems[0]


@pytest.mark.parametrize("text", [*BROKEN_TEXTS.values(), deep_array(), events_document("[" * 100_000), "NaN", '{"Events": []}',
                                  '{"DocumentIncarnation": NaN, "Events": []}', b"\xff\xfe{}", huge_string()])
def test_a_broken_document_is_one_imds_error(text: str | bytes) -> None:
    with pytest.raises(ImdsError) as caught:
        parse_document(text)
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


# -- instance metadata ---------------------------------------------------------------------------


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_hostile_instance_metadata_is_one_imds_error(hostile: str) -> None:
    for text in (HOSTILE_VALUES[hostile], f'{{"compute": {HOSTILE_VALUES[hostile]}}}',
                 f'{{"compute": {{"name": {HOSTILE_VALUES[hostile]}, "vmSize": "Standard_D2s_v3"}}}}'):
        with pytest.raises(ImdsError) as caught:
            parse_instance(text)
        assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


# -- the Retail Prices API and its cache --------------------------------------------------------


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_prices_answer_is_one_prices_error(hostile: str) -> None:
    for body in (HOSTILE_VALUES[hostile], f'{{"Items": [{HOSTILE_VALUES[hostile]}], "NextPageLink": null}}',
                 f'{{"Items": [], "NextPageLink": {HOSTILE_VALUES[hostile]}}}'):
        with HostilePrices(Answer(body=body.encode())) as api, pytest.raises(PricesError) as caught:
            fetch_quote(api.endpoint, "Standard_D2s_v3", "eastus")
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400


def _cache_file(tmp_path: Path, quote: str) -> Path:
    path = tmp_path / "prices-Standard_D2s_v3-eastus.json"
    path.write_text(f'{{"fetched_at": 4102444800, "endpoint": "https://p", "quote": {quote}}}')
    return path


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_price_cache_is_ignored(tmp_path: Path, hostile: str) -> None:
    value = HOSTILE_VALUES[hostile]
    quotes = [value]
    if hostile != "wrong-type-number":  # 12 is a price, if a steep one
        quotes += [f'{{"spot_usd_per_hour": {value}, "on_demand_usd_per_hour": 0.1}}',
                   f'{{"spot_usd_per_hour": 0.01, "on_demand_usd_per_hour": {value}}}']
    for quote in quotes:
        _cache_file(tmp_path, quote)
        assert read_cached(tmp_path, "https://p", "Standard_D2s_v3", "eastus", now=4102444800 + 1) is None


# -- checkpoint envelopes and files --------------------------------------------------------------


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_envelope_header_is_undecodable_not_a_crash(hostile: str) -> None:
    header = f'{{"releases": 1, "state": {HOSTILE_VALUES[hostile]}}}'
    if hostile in ("wrong-type-object", "wrong-type-number", "wrong-type-bool", "null", "nan", "infinity",
                   "minus-infinity"):
        parse_header(header)  # any JSON value is a valid checkpoint; NaN is what json.dumps writes for nan
        return
    with pytest.raises(UndecodableMessage):
        parse_header(header)
    with pytest.raises(UndecodableMessage):
        Codec("none").open(f"#spot-supervisor/2 id-1 {header}\nbody", "id-1")


class _Ctx:
    """What CheckpointFile asks of a Context: the message id, its state, and checkpoint()."""

    message_id = "id-1"
    state = None

    def __init__(self) -> None:
        self.stored: list[Any] = []

    def checkpoint(self, state: Any) -> bool:
        self.stored.append(state)
        return True


def test_a_hostile_checkpoint_file_is_one_warning_and_not_stored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ctx = _Ctx()
    path = tmp_path / "checkpoint.json"
    checkpoint = CheckpointFile(path, ctx)  # type: ignore[arg-type]
    path.write_text(deep_array(50_000))
    with caplog.at_level(logging.WARNING):
        checkpoint.sync()
    assert ctx.stored == []
    assert len(caplog.records) == 1 and "not valid JSON" in caplog.records[0].getMessage()
    assert caplog.records[0].exc_info is None
    path.write_text('{"step": 3}')
    checkpoint.sync()
    assert ctx.stored == [{"step": 3}]


# -- control lines and poison notes --------------------------------------------------------------


def test_a_hostile_control_line_is_skipped_alone(caplog: pytest.LogCaptureFixture) -> None:
    ours, theirs = socket.socketpair()
    try:
        channel = Channel(ours)
        theirs.sendall(deep_array(50_000).encode() + b"\n" + b'{"kind": "ok"}\n' + b"NaN\n")
        with caplog.at_level(logging.WARNING):
            messages = []
            for _ in range(100):
                messages += channel.receive()
                if messages:
                    break
        assert messages == [{"kind": "ok"}]
        assert all(len(r.getMessage()) < 400 and r.exc_info is None for r in caplog.records)
    finally:
        theirs.close()
        ours.close()


@pytest.mark.parametrize("hostile", sorted(HOSTILE_VALUES))
def test_a_hostile_poison_note_reads_as_no_note(hostile: str) -> None:
    text = f"#spot-supervisor-poisoned/1 {HOSTILE_VALUES[hostile]}\noriginal"
    original, note = read_poisoned(text)
    assert note is None and original == text
    good = poisoned_text("original", "handler failed", "id-1")
    assert read_poisoned(good)[1] is not None


def test_jsonsafe_never_raises_anything_but_json_error() -> None:
    for text in [*HOSTILE_VALUES.values(), *BROKEN_TEXTS.values(), huge_string(2 * jsonsafe.MAX_BYTES)]:
        try:
            jsonsafe.loads(text)
        except jsonsafe.JsonError as exc:
            assert "\n" not in str(exc)
        for split in (jsonsafe.object_members, jsonsafe.array_items):
            try:
                split(text)
            except jsonsafe.JsonError:
                pass
    assert json.loads(json.dumps(jsonsafe.loads('{"a": [1, {"b": null}]}'))) == {"a": [1, {"b": None}]}


def test_a_poison_note_is_ours_only_for_the_text_it_was_written_for() -> None:
    ours = poisoned_text("body one", "handler failed", "id-1")
    header = ours.split("\n", 1)[0]
    assert read_poisoned(ours)[1] is not None
    for forged in (f"{header}\nbody two", f"{header}\nbody one ", f"{header}\n"):
        assert read_poisoned(forged) == (forged, None)


def test_a_runaway_metadata_answer_is_read_only_up_to_the_cap() -> None:
    with HostilePrices(Answer(body=b'{"compute": {"name": "', padding_bytes=64 * 1024 * 1024)) as server:
        with pytest.raises(ImdsError, match="not read further"):
            fetch_instance_info(server.base, 30)
