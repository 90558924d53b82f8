"""EvictionPolicy: every shared fixture through a real simulator, then the rules one by one."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest

from supervisor.config import DEFAULT_DRAIN_ON, EventsSettings
from supervisor.events import eviction
from supervisor.events.azure import (
    AzureScheduledEvents,
    EventsDocument,
    ScheduledEvent,
)
from supervisor.events.eviction import EvictionNotice, EvictionPolicy, NoticeWithdrawn
from supervisor.simulator.server import ImdsSimulator
from testsupport.harness import AZURE_FIXTURES

VM = "vm-spot-07"
NOT_BEFORE = datetime(2026, 11, 21, 14, 0, 30, tzinfo=timezone.utc).timestamp()  # the fixtures' Preempt
NOW = NOT_BEFORE - 600.0  # a fixed "now" well before every fixture's NotBefore
SETTINGS = EventsSettings(safety_margin_s=5.0, started_deadline_s=5.0)


FIXTURES = AZURE_FIXTURES


# -- every fixture, served by the simulator and polled over HTTP -------------------------

@pytest.fixture(scope="module")
def served() -> Iterator[tuple[httpx.Client, AzureScheduledEvents]]:
    with ImdsSimulator(vm_name=VM) as sim, \
            httpx.Client(base_url=sim.url, trust_env=False, timeout=5) as ctl, \
            AzureScheduledEvents(sim.url, request_timeout_s=2, first_request_timeout_s=2) as source:
        yield ctl, source


def observe_fixture(served: tuple[httpx.Client, AzureScheduledEvents], name: str, vm_name: str = VM,
                    **settings: object) -> list[EvictionNotice | NoticeWithdrawn]:
    ctl, source = served
    assert ctl.post("/simulate/document", content=(FIXTURES / name).read_bytes()).status_code == 200
    policy = EvictionPolicy(vm_name, dataclasses.replace(SETTINGS, **settings))
    return policy.observe(source.poll(), NOW)


def only_drain(decisions: list[EvictionNotice | NoticeWithdrawn], event_id: str) -> EvictionNotice:
    assert len(decisions) == 1, decisions
    (drain,) = decisions
    assert isinstance(drain, EvictionNotice) and drain.event.event_id == event_id
    return drain


COVERED = {
    "scheduledevents-empty.json", "scheduledevents-preempt.json", "scheduledevents-preempt-other-vm.json",
    "scheduledevents-preempt-shared.json", "scheduledevents-preempt-started.json",
    "scheduledevents-freeze-short.json", "scheduledevents-reboot-user.json", "scheduledevents-terminate.json",
    "scheduledevents-mixed.json",
}


def test_every_fixture_has_a_test_below() -> None:
    assert {p.name for p in FIXTURES.glob("scheduledevents-*.json")} == COVERED


def test_empty(served) -> None:
    assert observe_fixture(served, "scheduledevents-empty.json") == []


def test_preempt_drains_and_acknowledges_with_the_safety_margin(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-preempt.json"), "A123BC45-1234-5678-AB90-ABCDEF123456")
    assert drain.acknowledge is True
    assert drain.deadline == NOT_BEFORE - 5.0


def test_preempt_for_another_vm_is_ignored(served) -> None:
    assert observe_fixture(served, "scheduledevents-preempt-other-vm.json") == []
    assert observe_fixture(served, "scheduledevents-preempt-other-vm.json", ack="always") == []


@pytest.mark.parametrize("ack,expected", [("sole", False), ("always", True), ("never", False)])
def test_shared_preempt_drains_but_acknowledges_only_if_told(served, ack: str, expected: bool) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-preempt-shared.json", ack=ack),
                       "C0FFEE00-1111-4222-8333-444455556666")
    assert drain.acknowledge is expected
    assert drain.deadline == NOT_BEFORE - 5.0


def test_started_preempt_drains_with_a_short_deadline(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-preempt-started.json", started_deadline_s=3.0),
                       "A123BC45-1234-5678-AB90-ABCDEF123456")
    assert drain.deadline == NOW + 3.0
    assert drain.acknowledge is False  # already under way: nothing left to approve


def test_freeze_is_logged_only_by_default(served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="supervisor.events.eviction"):
        assert observe_fixture(served, "scheduledevents-freeze-short.json") == []
    assert "Freeze F4EE2E00-2222-4333-8444-555566667777" in caplog.text


def test_freeze_drains_when_configured(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-freeze-short.json",
                                       drain_on=(*DEFAULT_DRAIN_ON, "Freeze")),
                       "F4EE2E00-2222-4333-8444-555566667777")
    assert drain.deadline == datetime(2026, 11, 21, 14, 15, tzinfo=timezone.utc).timestamp() - 5.0
    assert drain.event.duration_s == 5


def test_user_reboot_drains(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-reboot-user.json"),
                       "0BEE7000-3333-4444-8555-666677778888")
    assert drain.event.source == "User" and drain.event.event_type == "Reboot"
    assert drain.acknowledge is True


def test_scale_in_terminate_drains_the_named_instance(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-terminate.json", vm_name="vmss_3"),
                       "7E7E7E7E-4444-4555-8666-777788889999")
    assert drain.acknowledge is True
    assert drain.deadline == datetime(2026, 11, 21, 14, 5, tzinfo=timezone.utc).timestamp() - 5.0
    assert observe_fixture(served, "scheduledevents-terminate.json") == []  # not vm-spot-07's


def test_mixed_drains_exactly_this_vms_preempt(served) -> None:
    drain = only_drain(observe_fixture(served, "scheduledevents-mixed.json", ack="always",
                                       drain_on=("Freeze", "Redeploy", "Preempt")),
                       "33333333-AAAA-4BBB-8CCC-DDDDDDDDDDDD")
    assert drain.deadline == NOT_BEFORE - 5.0
    only_drain(observe_fixture(served, "scheduledevents-mixed.json"), "33333333-AAAA-4BBB-8CCC-DDDDDDDDDDDD")


# -- the rules, on hand-made documents -------------------------------------------------------

def event(event_id: str = "E1", event_type: str = "Preempt", *, resources: tuple[str, ...] = (VM,),
          status: str = "Scheduled", not_before: float | None = NOT_BEFORE, source: str = "Platform") -> ScheduledEvent:
    when = None if not_before is None else datetime.fromtimestamp(not_before, timezone.utc)
    return ScheduledEvent(event_id, event_type, status, resources, when, source, -1, "")


def doc(incarnation: int, *events: ScheduledEvent) -> EventsDocument:
    return EventsDocument(incarnation, tuple(events))


def policy(**settings: object) -> EvictionPolicy:
    return EvictionPolicy(VM, dataclasses.replace(SETTINGS, **settings))


def test_deadline_is_never_in_the_past() -> None:
    p = policy()
    (drain,) = p.observe(doc(1, event(not_before=NOT_BEFORE)), NOT_BEFORE - 2.0)
    assert drain.deadline == NOT_BEFORE - 2.0  # NotBefore - margin would be 3 s ago
    (late,) = policy().observe(doc(1, event(not_before=NOT_BEFORE)), NOT_BEFORE + 60)
    assert late.deadline == NOT_BEFORE + 60


def test_scheduled_event_with_empty_not_before_gets_the_started_deadline() -> None:
    (drain,) = policy(started_deadline_s=4.0).observe(doc(1, event(not_before=None)), NOW)
    assert drain.deadline == NOW + 4.0


def test_drain_is_emitted_once_per_event() -> None:
    p = policy()
    assert len(p.observe(doc(1, event("E1")), NOW)) == 1
    assert p.observe(doc(1, event("E1")), NOW + 1) == []
    assert p.observe(doc(2, event("E1"), event("X", resources=("other-vm",))), NOW + 2) == []
    assert p.observe(doc(3, event("E1", status="Started", not_before=None)), NOW + 3) == []
    (second,) = p.observe(doc(4, event("E1", status="Started", not_before=None), event("E2", "Reboot")), NOW + 4)
    assert isinstance(second, EvictionNotice) and second.event.event_id == "E2"


def test_cancelled_before_not_before_resumes() -> None:
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    (resume,) = p.observe(doc(2), NOT_BEFORE - 1)
    assert resume == NoticeWithdrawn("E1", resume.reason) and "cancelled" in resume.reason
    assert p.observe(doc(3), NOT_BEFORE - 0.5) == []


def test_disappearing_after_not_before_while_still_running_resumes() -> None:
    # Issue 16 defect 7: this process is alive, so the VM was not evicted: it must not hold forever.
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    (withdrawn,) = p.observe(doc(2), NOT_BEFORE + 1)
    assert withdrawn == NoticeWithdrawn("E1", withdrawn.reason) and "still running" in withdrawn.reason


def test_disappearing_after_it_started_while_still_running_resumes() -> None:
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    assert p.observe(doc(2, event("E1", status="Started", not_before=None)), NOW + 1) == []
    (withdrawn,) = p.observe(doc(3), NOW + 2)
    assert isinstance(withdrawn, NoticeWithdrawn) and withdrawn.event_id == "E1"


def test_an_older_document_is_ignored() -> None:
    p = policy()
    p.observe(doc(5, event("E1")), NOW)
    for i in range(4):  # a stale IMDS answer flapping with the current one
        assert p.observe(doc(4), NOW + 1 + i) == []
        assert p.observe(doc(5, event("E1")), NOW + 1.5 + i) == []


def test_an_older_numbering_that_stays_is_taken_as_restarted() -> None:
    p = policy()
    p.observe(doc(50), NOW)
    assert p.observe(doc(1, event("E1")), NOW + 1) == []
    (notice,) = p.observe(doc(1, event("E1")), NOW + 1 + eviction.OLDER_INCARNATION_ACCEPTED_AFTER_S)
    assert isinstance(notice, EvictionNotice)


def test_a_cancelled_event_that_comes_back_drains_again() -> None:
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    assert isinstance(p.observe(doc(2), NOW + 1)[0], NoticeWithdrawn)
    assert isinstance(p.observe(doc(3, event("E1")), NOW + 2)[0], EvictionNotice)


def test_event_moving_to_another_vm_counts_as_cancelled() -> None:
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    (resume,) = p.observe(doc(2, event("E1", resources=("other-vm",))), NOW + 1)
    assert isinstance(resume, NoticeWithdrawn)


def test_not_before_moved_later_is_tracked() -> None:
    p = policy()
    p.observe(doc(1, event("E1")), NOW)
    p.observe(doc(2, event("E1", not_before=NOT_BEFORE + 600)), NOW + 1)
    assert isinstance(p.observe(doc(3), NOT_BEFORE + 10)[0], NoticeWithdrawn)


@pytest.mark.parametrize("resources,ack,expected", [
    ((VM,), "sole", True), ((VM, "other-vm"), "sole", False), ((VM,), "always", True),
    ((VM, "other-vm"), "always", True), ((VM,), "never", False), ((VM, VM.upper()), "sole", True),
])
def test_acknowledge_rule(resources: tuple[str, ...], ack: str, expected: bool) -> None:
    (drain,) = policy(ack=ack).observe(doc(1, event(resources=resources)), NOW)
    assert drain.acknowledge is expected


@pytest.mark.parametrize("resources,ack,status,why", [
    ((VM,), "sole", "Scheduled", ""), ((VM, "other-vm"), "sole", "Scheduled", "other VMs are listed"),
    ((VM,), "never", "Scheduled", 'events.ack is "never"'), ((VM,), "always", "Started", "already started"),
])
def test_a_notice_carries_why_it_is_not_acknowledged(resources: tuple[str, ...], ack: str, status: str, why: str) -> None:
    (drain,) = policy(ack=ack).observe(doc(1, event(resources=resources, status=status)), NOW)
    assert drain.acknowledge is (not why)
    assert (why in drain.not_acknowledged_because) if why else drain.not_acknowledged_because == ""


def test_vm_names_compare_case_insensitively() -> None:
    assert len(policy().observe(doc(1, event(resources=("VM-SPOT-07",))), NOW)) == 1


def test_other_vms_events_are_logged_once_per_incarnation(caplog: pytest.LogCaptureFixture) -> None:
    p = policy(ack="always")
    other = event("O1", resources=("other-vm",))
    with caplog.at_level(logging.INFO, logger="supervisor.events.eviction"):
        for _ in range(3):
            assert p.observe(doc(5, other), NOW) == []
        assert sum("O1" in r.getMessage() for r in caplog.records) == 1
        assert p.observe(doc(6, other), NOW) == []
        assert sum("O1" in r.getMessage() for r in caplog.records) == 2


def test_types_outside_drain_on_are_not_acted_on() -> None:
    p = policy(drain_on=("Preempt",))
    assert p.observe(doc(1, event("R", "Reboot"), event("F", "Freeze"), event("T", "Terminate")), NOW) == []


def test_vm_name_is_required() -> None:
    with pytest.raises(ValueError):
        EvictionPolicy("", SETTINGS)

