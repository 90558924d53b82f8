"""Scheduled Events: parsing, the HTTP client, backoff, and the watcher thread, against a real simulator."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest

from supervisor.config import EventsSettings
from supervisor.events.azure import (
    AzureScheduledEvents,
    EventsDocument,
    ScheduledEvent,
    parse_document,
)
from supervisor.events.eviction import Decision, EvictionNotice, NoticeWithdrawn
from supervisor.events.watcher import EventWatcher
from supervisor.simulator.server import ImdsSimulator
from supervisor.vm.imds import ImdsError
from testsupport.harness import AZURE_FIXTURES
from testsupport.net import free_port
from worker.common.backoff import Backoff

VM = "vm-spot-07"


FIXTURES = AZURE_FIXTURES
DOCUMENTS = sorted(p.name for p in FIXTURES.glob("scheduledevents-*.json"))


@pytest.fixture
def sim() -> Iterator[ImdsSimulator]:
    with ImdsSimulator(vm_name=VM) as simulator:
        yield simulator


@pytest.fixture
def ctl(sim: ImdsSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, trust_env=False, timeout=5) as client:
        yield client


@pytest.fixture
def client(sim: ImdsSimulator) -> Iterator[AzureScheduledEvents]:
    with AzureScheduledEvents(sim.url, request_timeout_s=0.3, first_request_timeout_s=0.3) as events:
        yield events


# -- parse_document ------------------------------------------------------------------

def test_parse_preempt_fixture() -> None:
    doc = parse_document((FIXTURES / "scheduledevents-preempt.json").read_bytes())
    assert doc == EventsDocument(incarnation=2, events=(ScheduledEvent(
        event_id="A123BC45-1234-5678-AB90-ABCDEF123456", event_type="Preempt", status="Scheduled",
        resources=("vm-spot-07",), not_before=datetime(2026, 11, 21, 14, 0, 30, tzinfo=timezone.utc),
        source="Platform", duration_s=-1, description=""),))
    assert doc.events[0].not_before.utcoffset().total_seconds() == 0  # type: ignore[union-attr]


def test_parse_started_fixture_has_no_not_before() -> None:
    doc = parse_document((FIXTURES / "scheduledevents-preempt-started.json").read_text())
    assert doc.events[0].status == "Started" and doc.events[0].not_before is None


@pytest.mark.parametrize("name", DOCUMENTS)
def test_parse_every_fixture(name: str) -> None:
    raw = json.loads((FIXTURES / name).read_text())
    doc = parse_document(json.dumps(raw))
    assert doc.incarnation == raw["DocumentIncarnation"]
    assert [e.event_id for e in doc.events] == [e["EventId"] for e in raw["Events"]]
    for event, item in zip(doc.events, raw["Events"]):
        assert event.resources == tuple(item["Resources"])
        assert (event.not_before is None) == (item["NotBefore"] == "")
        assert (event.event_type, event.status, event.source, event.duration_s, event.description) == (
            item["EventType"], item["EventStatus"], item["EventSource"], item["DurationInSeconds"],
            item["Description"])


GOOD_EVENT = {"EventId": "x", "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType": "VirtualMachine",
              "Resources": ["vm"], "NotBefore": "Sat, 21 Nov 2026 14:00:30 GMT", "Description": "",
              "EventSource": "Platform", "DurationInSeconds": -1}


def _doc_with(**changes: object) -> str:
    event = {k: v for k, v in {**GOOD_EVENT, **changes}.items() if v is not ...}
    return json.dumps({"DocumentIncarnation": 1, "Events": [event]})


@pytest.mark.parametrize("raw", [
    b"", b"not json", b"\xff\xfe", b"[]", b"null", b'"text"',
    b'{"Events": []}', b'{"DocumentIncarnation": 1}', b'{"DocumentIncarnation": "1", "Events": []}',
    b'{"DocumentIncarnation": true, "Events": []}', b'{"DocumentIncarnation": 1.5, "Events": []}',
    b'{"DocumentIncarnation": 1, "Events": {}}',
], ids=repr)
def test_parse_rejects_garbage(raw: bytes | str) -> None:
    with pytest.raises(ImdsError) as excinfo:
        parse_document(raw)
    assert "\n" not in str(excinfo.value)


OTHER_VMS_EVENT = {**GOOD_EVENT, "EventId": "other", "Resources": ["vm-2"]}


@pytest.mark.parametrize("bad", [
    "x", {**OTHER_VMS_EVENT, "EventId": 7}, {k: v for k, v in OTHER_VMS_EVENT.items() if k != "EventType"},
    {**OTHER_VMS_EVENT, "EventStatus": None}, {**OTHER_VMS_EVENT, "Resources": "vm"},
    {**OTHER_VMS_EVENT, "Resources": [1]}, {k: v for k, v in OTHER_VMS_EVENT.items() if k != "Resources"},
], ids=repr)
def test_an_unreadable_event_is_skipped_and_the_others_still_count(bad: object) -> None:
    # Issue 16 defect 4: one bad event rejected the whole document, hiding a Preempt for this VM.
    doc = parse_document(json.dumps({"DocumentIncarnation": 3, "Events": [bad, GOOD_EVENT]}))
    assert [e.event_id for e in doc.events] == ["x"]
    assert len(doc.problems) == 1 and "Events[0]" in doc.problems[0] and "skipped" in doc.problems[0]
    assert "\n" not in doc.problems[0]


@pytest.mark.parametrize(("change", "read_as"), [
    ({"DurationInSeconds": 7.5}, ("duration_s", -1)), ({"DurationInSeconds": "5"}, ("duration_s", -1)),
    ({"EventSource": 1}, ("source", "")), ({"Description": None}, ("description", "")),
    ({"NotBefore": "tomorrow"}, ("not_before", None)), ({"NotBefore": 0}, ("not_before", None)),
    ({"NotBefore": ...}, ("not_before", None)),
], ids=repr)
def test_an_event_with_an_unreadable_detail_is_kept_with_a_default(change: dict[str, object],
                                                                     read_as: tuple[str, object]) -> None:
    event = {k: v for k, v in {**GOOD_EVENT, **change}.items() if v is not ...}
    doc = parse_document(json.dumps({"DocumentIncarnation": 3, "Events": [event]}))
    assert len(doc.problems) == 1 and "\n" not in doc.problems[0]
    assert getattr(doc.events[0], read_as[0]) == read_as[1]


def test_parse_tolerates_missing_optional_fields() -> None:
    doc = parse_document(_doc_with(EventSource=..., DurationInSeconds=..., Description=..., ResourceType=...))
    assert (doc.events[0].source, doc.events[0].duration_s, doc.events[0].description) == ("", -1, "")


# -- AzureScheduledEvents ------------------------------------------------------------

@pytest.mark.parametrize("name", DOCUMENTS)
def test_poll_returns_the_served_document(ctl: httpx.Client, client: AzureScheduledEvents, name: str) -> None:
    raw = (FIXTURES / name).read_bytes()
    ctl.post("/simulate/document", content=raw)
    assert client.poll() == parse_document(raw)


def test_acknowledge_sends_the_documented_request(ctl: httpx.Client, client: AzureScheduledEvents) -> None:
    event_id = ctl.post("/simulate/eviction", json={"delay_s": 30}).json()["EventId"]
    client.acknowledge(event_id)
    (ack,) = ctl.get("/simulate/acks").json()
    assert ack["raw"] == '{"StartRequests": [{"EventId": "%s"}]}' % event_id
    assert ack["body"] == {"StartRequests": [{"EventId": event_id}]}
    assert ack["headers"]["Metadata"] == "true"
    assert ack["headers"]["Content-Type"] == "application/json"
    (event,) = client.poll().events
    assert event.status == "Started" and event.not_before is None


def test_acknowledge_non_2xx_is_an_imds_error(sim: ImdsSimulator) -> None:
    with AzureScheduledEvents(sim.url + "/wrong", request_timeout_s=1) as events:
        with pytest.raises(ImdsError, match="HTTP 404"):
            events.acknowledge("x")


def test_unreachable_endpoint_is_an_imds_error() -> None:
    with AzureScheduledEvents(f"http://127.0.0.1:{free_port()}", 0.5, 0.5) as events:
        with pytest.raises(ImdsError):
            events.poll()
        with pytest.raises(ImdsError):
            events.acknowledge("x")


@pytest.mark.parametrize("mode", ["500", "410", "429", "slow", "garbage", "reset"])
def test_faults_raise_imds_error_then_polling_recovers(ctl: httpx.Client, client: AzureScheduledEvents,
                                                        mode: str) -> None:
    client.poll()
    ctl.post("/simulate/faults", json={"mode": mode, "count": 1, "delay_s": 0.6 if mode == "slow" else 0})
    with pytest.raises(ImdsError) as excinfo:
        client.poll()
    assert "\n" not in str(excinfo.value)
    if mode in ("500", "410", "429"):
        assert excinfo.value.status == int(mode)
    assert client.poll().incarnation == 1


def test_retry_after_is_reported(ctl: httpx.Client, client: AzureScheduledEvents) -> None:
    ctl.post("/simulate/faults", json={"mode": "429", "count": 1, "retry_after_s": 7})
    with pytest.raises(ImdsError) as excinfo:
        client.poll()
    assert (excinfo.value.status, excinfo.value.retry_after_s) == (429, 7.0)


def test_first_request_gets_the_longer_timeout(ctl: httpx.Client, sim: ImdsSimulator) -> None:
    ctl.post("/simulate/faults", json={"mode": "slow", "count": 3, "delay_s": 0.5})
    with AzureScheduledEvents(sim.url, request_timeout_s=0.2, first_request_timeout_s=3) as events:
        assert events.poll().incarnation == 1  # slow, but within the first-call allowance
        with pytest.raises(ImdsError, match="timed out"):
            events.poll()


def test_first_request_timeout_holds_until_a_success(ctl: httpx.Client, sim: ImdsSimulator) -> None:
    ctl.post("/simulate/faults", json={"mode": "500", "count": 1})
    with AzureScheduledEvents(sim.url, request_timeout_s=0.2, first_request_timeout_s=3) as events:
        with pytest.raises(ImdsError):
            events.poll()
        ctl.post("/simulate/faults", json={"mode": "slow", "count": 1, "delay_s": 0.5})
        assert events.poll().incarnation == 1


def test_proxy_environment_is_ignored(monkeypatch: pytest.MonkeyPatch, sim: ImdsSimulator) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.setenv(name, dead_proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    with AzureScheduledEvents(sim.url, 1, 1) as events:
        assert events.poll().incarnation == 1


# -- Backoff -------------------------------------------------------------------------

def test_backoff_full_jitter_grows_to_the_cap_and_resets() -> None:
    backoff = Backoff(base_s=0.5, cap_s=4.0, rng=random.Random(7))
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for ceiling in ceilings:
        samples = [Backoff(0.5, 4.0, random.Random(i)) for i in range(200)]
        for b in samples:
            b.failures = backoff.failures
        delays = [b.next_delay() for b in samples]
        assert all(0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # jitter spreads over the whole range
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert all(Backoff(0.5, 4.0, random.Random(i)).next_delay() <= 0.5 for i in range(50))


def test_backoff_survives_many_failures() -> None:
    backoff = Backoff(0.5, 4.0)
    for _ in range(5000):
        assert 0 <= backoff.next_delay() <= 4.0


# -- EventWatcher ----------------------------------------------------------------------

class Recorder:
    def __init__(self) -> None:
        self.decisions: list[Decision] = []
        self.changed = threading.Condition()

    def __call__(self, decision: Decision) -> None:
        with self.changed:
            self.decisions.append(decision)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> list[Decision]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.decisions) >= count, timeout)
            return list(self.decisions)


SETTINGS = EventsSettings(poll_interval_s=0.05, request_timeout_s=0.2, safety_margin_s=1.0)


@pytest.fixture
def watch(sim: ImdsSimulator) -> Iterator[callable]:
    started: list[tuple[EventWatcher, AzureScheduledEvents]] = []

    def start(settings: EventsSettings = SETTINGS, on_decision=None, backoff: Backoff | None = None,
              ) -> tuple[EventWatcher, Recorder]:
        recorder = Recorder()
        source = AzureScheduledEvents(sim.url, settings.request_timeout_s, first_request_timeout_s=0.2)
        watcher = EventWatcher(source, settings, VM, backoff=backoff or Backoff(base_s=0.02, cap_s=0.2))
        started.append((watcher, source))
        watcher.watch(on_decision or recorder)
        return watcher, recorder

    yield start
    for watcher, source in started:
        watcher.stop()
        source.close()


def gets(ctl: httpx.Client) -> int:
    return ctl.get("/simulate/requests").json().get("GET /metadata/scheduledevents", 0)


def wait_for_gets(ctl: httpx.Client, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while gets(ctl) < count:
        assert time.monotonic() < deadline, f"fewer than {count} polls after {timeout}s"
        time.sleep(0.02)


@pytest.mark.parametrize("mode", ["500", "410", "429", "slow", "garbage", "reset"])
def test_watcher_rides_out_faults_and_still_sees_a_later_eviction(ctl: httpx.Client, watch, mode: str) -> None:
    ctl.post("/simulate/faults", json={"mode": mode, "count": 4, "delay_s": 0.4 if mode == "slow" else 0,
                                       "retry_after_s": 0.05 if mode == "429" else None})
    watcher, recorder = watch()
    wait_for_gets(ctl, 6)  # four failures, then answers again
    assert recorder.decisions == []
    assert watcher.is_alive() and watcher.consecutive_failures == 0 and watcher.incarnation == 1

    event_id = ctl.post("/simulate/eviction", json={"delay_s": 20}).json()["EventId"]
    seen_at = time.monotonic()
    decisions = recorder.wait_for(1, timeout=2)
    assert time.monotonic() - seen_at < 1.0
    assert len(decisions) == 1 and isinstance(decisions[0], EvictionNotice)
    assert decisions[0].event.event_id == event_id and decisions[0].acknowledge


def test_watcher_does_not_read_errors_as_no_events(ctl: httpx.Client, watch) -> None:
    event_id = ctl.post("/simulate/eviction", json={"delay_s": 20}).json()["EventId"]
    watcher, recorder = watch()
    assert [d.event.event_id for d in recorder.wait_for(1, 2)] == [event_id]  # type: ignore[union-attr]
    before = gets(ctl)
    ctl.post("/simulate/faults", json={"mode": "500", "count": 1000})
    wait_for_gets(ctl, before + 8)
    ctl.post("/simulate/faults", json={"mode": "garbage", "count": 1000})
    wait_for_gets(ctl, before + 14)
    assert len(recorder.decisions) == 1  # no NoticeWithdrawn: the event did not vanish, IMDS failed
    assert watcher.is_alive() and watcher.consecutive_failures > 0


def test_watcher_errors_before_the_first_success_decide_nothing(ctl: httpx.Client, watch) -> None:
    ctl.post("/simulate/eviction", json={"delay_s": 20})
    ctl.post("/simulate/faults", json={"mode": "500", "count": 1000})
    watcher, recorder = watch()
    wait_for_gets(ctl, 5)
    assert recorder.decisions == [] and watcher.incarnation is None
    ctl.post("/simulate/faults", json={"mode": "500", "count": 0})
    assert len(recorder.wait_for(1, 2)) == 1


def test_watcher_resumes_when_the_eviction_is_cancelled(ctl: httpx.Client, watch) -> None:
    event_id = ctl.post("/simulate/eviction", json={"delay_s": 20}).json()["EventId"]
    watcher, recorder = watch()
    recorder.wait_for(1, 2)
    assert ctl.delete(f"/simulate/event/{event_id}").status_code == 200
    decisions = recorder.wait_for(2, 2)
    assert [type(d) for d in decisions] == [EvictionNotice, NoticeWithdrawn]
    assert decisions[1].event_id == event_id  # type: ignore[union-attr]


def test_watcher_drains_once_per_event(ctl: httpx.Client, watch) -> None:
    event_id = ctl.post("/simulate/eviction", json={"delay_s": 0.3}).json()["EventId"]
    watcher, recorder = watch()
    recorder.wait_for(1, 2)
    incarnation = watcher.incarnation
    # the event starts at NotBefore: a new incarnation, the same event, no second EvictionNotice
    deadline = time.monotonic() + 3
    while watcher.incarnation == incarnation:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    ctl.post("/metadata/scheduledevents?api-version=2020-07-01", headers={"Metadata": "true"},
             json={"StartRequests": [{"EventId": event_id}]})
    time.sleep(0.2)
    assert [d.event.event_id for d in recorder.decisions] == [event_id]  # type: ignore[union-attr]


def test_watcher_honours_retry_after_within_the_cap(ctl: httpx.Client, watch) -> None:
    ctl.post("/simulate/faults", json={"mode": "429", "count": 1, "retry_after_s": 0.6})
    watch(backoff=Backoff(base_s=0.01, cap_s=1.0))
    wait_for_gets(ctl, 1)
    time.sleep(0.35)
    assert gets(ctl) == 1  # still waiting as told
    wait_for_gets(ctl, 2, timeout=2)


def test_watcher_caps_a_long_retry_after(ctl: httpx.Client, watch) -> None:
    ctl.post("/simulate/faults", json={"mode": "429", "count": 1, "retry_after_s": 120})
    watch(backoff=Backoff(base_s=0.01, cap_s=0.2))
    wait_for_gets(ctl, 2, timeout=1.5)


def test_watcher_survives_a_failing_callback(ctl: httpx.Client, watch) -> None:
    calls: list[Decision] = []

    def explode(decision: Decision) -> None:
        calls.append(decision)
        raise RuntimeError("callback bug")

    watcher, _ = watch(on_decision=explode)
    ctl.post("/simulate/eviction", json={"delay_s": 20})
    ctl.post("/simulate/event", json={"type": "Reboot", "delay_s": 20, "source": "User"})
    deadline = time.monotonic() + 2
    while len(calls) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert watcher.is_alive()


def test_watcher_stops_promptly(ctl: httpx.Client, watch) -> None:
    watcher, _ = watch(settings=EventsSettings(poll_interval_s=30, request_timeout_s=0.2))
    wait_for_gets(ctl, 1)
    started = time.monotonic()
    watcher.stop()
    assert not watcher.is_alive()
    assert time.monotonic() - started < 0.5


def test_a_wrong_endpoint_is_reported_again_and_again_never_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 21: after the first warning a wrong IMDS endpoint went quiet (DEBUG), though evictions stayed
    unwatched for as long as the service ran. Now one WARNING per interval while it keeps failing."""
    dead = f"http://127.0.0.1:{free_port()}"
    settings = EventsSettings(endpoint=dead, request_timeout_s=0.2)
    source = AzureScheduledEvents(dead, 0.2, first_request_timeout_s=0.2)
    watcher = EventWatcher(source, settings, "", name_backoff=Backoff(base_s=0.02, cap_s=0.05), warning_every_s=0.2)
    with caplog.at_level("DEBUG", logger="supervisor.events.watcher"):
        watcher.watch(lambda decision: None)
        try:
            deadline = time.monotonic() + 10
            while sum(r.levelname == "WARNING" for r in caplog.records) < 3:
                assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
                time.sleep(0.05)
        finally:
            watcher.stop()
            source.close()
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert all("evictions are not watched" in r.getMessage() and dead in r.getMessage() for r in warnings)
    assert all(r.exc_info is None and "\n" not in r.getMessage() for r in caplog.records)
    assert any(r.levelname == "DEBUG" for r in caplog.records)  # the attempts in between stay quiet
