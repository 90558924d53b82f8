"""Attacks on the fleet keeper: an ARM that never answers or answers garbage, a scale set that refuses us,
hostile retire messages, a token endpoint that is down. Each: the keeper finishes its pass, exits 0 for
--once, reports the problem, and does exactly nothing wrong to the fleet."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from supervisor.fleet.retire import retire_message
from testsupport.azurite import Azurite
from testsupport.fleet import FleetRig


@pytest.fixture
def rig(azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path) -> Iterator[FleetRig]:
    fleet = FleetRig(azurite, queue_name, tmp_path).start()
    try:
        yield fleet
    finally:
        fleet.stop()


FIXED2 = {"fleet_target": "fixed", "fleet_vms": "2"}


def test_an_arm_that_never_answers_costs_one_scale_set_not_the_pass(rig: FleetRig) -> None:
    stalled = rig.add_scale_set("pool-a")
    rig.add_scale_set("pool-b")
    rig.arm.add_fault(stalled, "stall", count=-1)
    started = time.monotonic()
    result = rig.once(fleet_request_timeout_s="1", **FIXED2)
    assert rig.alive("pool-b") == ["0", "1"]
    assert "pool-a: unreachable" in result.stderr
    assert time.monotonic() - started < 100  # bounded by request_timeout_s and the retry count, not forever


@pytest.mark.parametrize("mode", ["garbage", "deep"])
def test_garbage_or_deeply_nested_json_from_arm_is_reported_not_a_crash(rig: FleetRig, mode: str) -> None:
    broken = rig.add_scale_set("pool-a")
    rig.add_scale_set("pool-b")
    rig.arm.add_fault(broken, mode, count=-1, methods=("GET",))
    result = rig.once(**FIXED2)
    assert rig.alive("pool-b") == ["0", "1"] and rig.alive("pool-a") == []
    assert "Traceback" not in result.stderr and "pool-a: " in result.stderr
    plan = rig.plan(**FIXED2)
    assert plan["scale_sets"][0]["reachable"] is False


def test_a_403_on_writes_to_one_scale_set_moves_the_deficit_on(rig: FleetRig) -> None:
    refusing = rig.add_scale_set("pool-a")
    rig.add_scale_set("pool-b")
    rig.arm.add_fault(refusing, "403", count=-1, methods=("PATCH",))
    result = rig.once(**FIXED2)
    assert rig.alive("pool-b") == ["0", "1"] and rig.alive("pool-a") == []
    assert "AuthorizationFailed" in result.stderr


def test_hostile_retire_messages_delete_nothing_but_what_was_asked(rig: FleetRig) -> None:
    ours = rig.add_scale_set("pool-a")
    rig.once(fleet_target="fixed", fleet_vms="4")
    other = rig.arm.add_scale_set("not-ours", capacity=1)  # a scale set of someone else's, same ARM
    fleet_queue = rig.fleet_queue()
    valid = retire_message(f"{ours}/virtualMachines/1", "pool-a_1")
    hostile = [
        valid, valid,  # replayed in the same batch
        json.dumps({"kind": "retire", "resource_id": ["x"], "vm_name": {"a": 1}, "at": "now"}),
        json.dumps({"kind": "retire", "resource_id": f"{ours}/virtualMachines/2", "vm_name": "pool-a_2", "at": 1e308}),
        json.dumps({"kind": "retire", "resource_id": f"{ours}/virtualMachines/2", "vm_name": "x" * 60_000, "at": time.time()}),
        "[" * 30_000 + "]" * 30_000,
        retire_message(f"{other}/virtualMachines/0", "not-ours_0"),
        retire_message(f"{ours}/virtualMachines/3", "pool-a_0"),  # a name that is not that instance's
        retire_message(f"{ours}/virtualMachines/0", "pool-a_0", at=time.time() - 3600),  # stale: that VM resumed long ago
        "not json at all <&> \u2603 ]]>",  # (a NUL cannot travel in the Queue service's XML; Azurite takes it, then hides the batch)
    ]
    for text in hostile:
        fleet_queue.send_message(text)
    spot = {"fleet_target": "fixed", "fleet_vms": "0", "fleet_min_vms": "0"}
    result = rig.once(**spot)
    assert rig.alive("pool-a") == ["0", "2", "3"], result.stderr
    assert rig.arm.snapshot()["not-ours"]["capacity"] == 1
    assert rig.arm.count_requests("POST", "/delete") == 1
    assert fleet_queue.get_queue_properties().approximate_message_count == 0
    assert "Traceback" not in result.stderr
    fleet_queue.send_message(valid)  # replayed later: that instance is gone, nothing else is touched
    rig.once(**spot)
    assert rig.alive("pool-a") == ["0", "2", "3"] and rig.arm.count_requests("POST", "/delete") == 1


def test_a_token_endpoint_that_is_down_is_reported_and_the_next_pass_recovers(rig: FleetRig) -> None:
    rig.add_scale_set("pool-a")
    rig.imds.identity.available = False
    result = rig.once(**FIXED2)
    assert rig.alive("pool-a") == [] and rig.arm.count_requests("GET") == 0
    assert "pool-a: unreachable" in result.stderr and "Traceback" not in result.stderr
    rig.imds.identity.available = True
    rig.once(**FIXED2)
    assert rig.alive("pool-a") == ["0", "1"]
