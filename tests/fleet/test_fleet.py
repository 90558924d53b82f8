"""The fleet keeper end to end: `spot-supervisor fleet ...` as a real process, the ARM stand-in over real
HTTPS (a certificate made for the test, trusted through REQUESTS_CA_BUNDLE), tokens from the IMDS
simulator's managed-identity endpoint through azure-identity, and the backlog in a real Azurite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from supervisor.fleet.retire import retire_message
from testsupport.azurite import Azurite
from testsupport.fleet import FleetRig
from testsupport.harness import REPO, processes_sample_work
from testsupport.waiting import wait_until


@pytest.fixture
def rig(azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path) -> Iterator[FleetRig]:
    fleet = FleetRig(azurite, queue_name, tmp_path).start()
    try:
        yield fleet
    finally:
        fleet.stop()


def send(queue: QueueClient, count: int) -> None:
    for i in range(count):
        queue.send_message(f"work {i}")


def writes(rig: FleetRig) -> int:
    return sum(rig.arm.count_requests(method) for method in ("PATCH", "POST"))


def test_scale_up_from_zero_to_the_target(rig: FleetRig, queue: QueueClient) -> None:
    rig.add_scale_set("pool-a")
    send(queue, 25)
    result = rig.once(fleet_messages_per_vm="10")
    assert rig.alive("pool-a") == ["0", "1", "2"]
    assert "target 3" in result.stderr
    plan = rig.plan(fleet_messages_per_vm="10")
    assert plan["backlog"] == {"visible": 25, "in_flight": 0, "exact": True, "error": None}
    assert plan["target"] == 3 and plan["deficit"] == 0
    assert [(s["capacity"], s["running"], s["action"]) for s in plan["scale_sets"]] == [(3, 3, "none")]


def test_a_full_queue_never_exceeds_max_vms(rig: FleetRig, queue: QueueClient) -> None:
    rig.add_scale_set("pool-a", available=2)
    rig.add_scale_set("pool-b")
    send(queue, 200)
    for _ in range(2):
        rig.once(fleet_messages_per_vm="1", fleet_max_vms="5")
    assert len(rig.alive("pool-a")) + len(rig.alive("pool-b")) == 5
    assert rig.plan(fleet_messages_per_vm="1", fleet_max_vms="5")["target"] == 5


def test_delete_policy_eviction_is_restored(rig: FleetRig, queue: QueueClient) -> None:
    scale_set = rig.add_scale_set("pool-a", eviction_policy="Delete")
    rig.once(fleet_target="fixed", fleet_vms="3")
    rig.arm.evict(scale_set, "1")
    assert rig.alive("pool-a") == ["0", "2"]
    rig.once(fleet_target="fixed", fleet_vms="3")
    assert rig.alive("pool-a") == ["0", "2", "3"]


def test_deallocate_policy_eviction_is_restarted(rig: FleetRig) -> None:
    scale_set = rig.add_scale_set("pool-a", eviction_policy="Deallocate")
    rig.once(fleet_target="fixed", fleet_vms="2")
    rig.arm.evict(scale_set, "0")
    plan = rig.plan(fleet_target="fixed", fleet_vms="2")
    assert plan["scale_sets"][0]["deallocated"] == 1 and plan["scale_sets"][0]["action"] == "start 1 deallocated (0)"
    rig.once(fleet_target="fixed", fleet_vms="2")
    assert rig.alive("pool-a") == ["0", "1"]
    assert rig.arm.count_requests("POST", "/start") == 1 and rig.arm.count_requests("PATCH") == 1


def test_deallocate_policy_eviction_is_replaced_when_so_configured(rig: FleetRig) -> None:
    scale_set = rig.add_scale_set("pool-a", eviction_policy="Deallocate")
    rig.once(fleet_target="fixed", fleet_vms="2")
    rig.arm.evict(scale_set, "0")
    rig.once(fleet_target="fixed", fleet_vms="2", fleet_on_deallocated="replace")
    assert rig.alive("pool-a") == ["1", "2"]
    assert rig.arm.count_requests("POST", "/start") == 0


def test_failed_and_unhealthy_instances_are_replaced(rig: FleetRig) -> None:
    scale_set = rig.add_scale_set("pool-a")
    rig.once(fleet_target="fixed", fleet_vms="3")
    rig.arm.fail_instance(scale_set, "0")
    rig.arm.fail_instance(scale_set, "2", health=True)
    assert rig.plan(fleet_target="fixed", fleet_vms="3")["scale_sets"][0]["failed"] == 2
    rig.once(fleet_target="fixed", fleet_vms="3")
    assert rig.alive("pool-a") == ["1", "3", "4"]


def test_allocation_failure_fills_the_second_scale_set_and_the_first_is_retried_after_its_cooldown(
        rig: FleetRig, queue: QueueClient, supervisors: object) -> None:
    first = rig.add_scale_set("pool-a", available=1, refusal_code="SkuNotAvailable")
    rig.add_scale_set("pool-b", available=2)
    send(queue, 3)
    keeper = subprocess.Popen([sys.executable, "-m", "supervisor", "fleet", "run"], text=True, stderr=subprocess.PIPE,
                              env=rig.env(fleet_messages_per_vm="1", fleet_allocation_cooldown_s="3"))
    try:
        wait_until(lambda: len(rig.alive("pool-a")) == 1 and len(rig.alive("pool-b")) == 2, 60, "pool-b takes the rest")
        refused_at = time.monotonic()
        rig.arm.set_allocation(first, None)
        send(queue, 2)  # two more wanted: pool-b is full, pool-a takes them, but only once its cool-down has passed
        wait_until(lambda: len(rig.alive("pool-a")) == 3, 60, "pool-a used again after its cool-down")
        assert time.monotonic() - refused_at >= 2.0
        assert len(rig.alive("pool-b")) == 2
    finally:
        keeper.terminate()
        _, err = keeper.communicate(timeout=30)
    assert keeper.returncode == 0, err
    assert "pool-a refused the allocation" in err and "SkuNotAvailable" in err


def test_a_retire_request_deletes_exactly_that_instance(rig: FleetRig, queue: QueueClient) -> None:
    scale_set = rig.add_scale_set("pool-a")
    rig.once(fleet_target="fixed", fleet_vms="3")
    fleet_queue = rig.fleet_queue()
    fleet_queue.send_message(retire_message(f"{scale_set}/virtualMachines/1", "pool-a_1"))
    spot = {"fleet_target": "fixed", "fleet_vms": "0", "fleet_min_vms": "1"}
    before = rig.plan(**spot)
    assert [(r["vm_name"], r["granted"]) for r in before["retire_requests"]] == [("pool-a_1", True)]
    assert rig.arm.snapshot()["pool-a"]["capacity"] == 3 and fleet_queue.get_queue_properties().approximate_message_count == 1
    rig.once(**spot)
    assert rig.alive("pool-a") == ["0", "2"]
    assert rig.arm.snapshot()["pool-a"]["capacity"] == 2
    assert fleet_queue.get_queue_properties().approximate_message_count == 0


def test_a_retire_request_below_min_vms_is_refused(rig: FleetRig) -> None:
    scale_set = rig.add_scale_set("pool-a")
    rig.once(fleet_target="fixed", fleet_vms="2")
    fleet_queue = rig.fleet_queue()
    fleet_queue.send_message(retire_message(f"{scale_set}/virtualMachines/0", "pool-a_0"))
    spot = {"fleet_target": "fixed", "fleet_vms": "0", "fleet_min_vms": "2"}
    result = rig.once(**spot)
    assert rig.alive("pool-a") == ["0", "1"]
    assert "refused" in result.stderr and "min_vms 2" in result.stderr
    assert fleet_queue.get_queue_properties().approximate_message_count == 0  # answered: the VM resumes by itself


def test_in_flight_messages_keep_the_target_up(rig: FleetRig, queue: QueueClient) -> None:
    rig.add_scale_set("pool-a")
    send(queue, 4)
    leased = list(queue.receive_messages(messages_per_page=4, max_messages=4, visibility_timeout=300))
    assert len(leased) == 4
    plan = rig.plan(fleet_messages_per_vm="2")
    assert plan["backlog"] == {"visible": 0, "in_flight": 4, "exact": True, "error": None}
    assert plan["target"] == 2
    rig.once(fleet_messages_per_vm="2")
    assert rig.alive("pool-a") == ["0", "1"]


def test_arm_429_and_503_are_retried(rig: FleetRig) -> None:
    scale_set = rig.add_scale_set("pool-a")
    rig.arm.add_fault(scale_set, "429", count=2, retry_after_s=1, methods=("GET",))
    rig.arm.add_fault(scale_set, "503", count=1, retry_after_s=1, methods=("PATCH",))
    rig.once(fleet_target="fixed", fleet_vms="2")
    assert rig.alive("pool-a") == ["0", "1"]
    assert rig.arm.count_requests("PATCH") == 2


def test_a_403_on_one_scale_set_does_not_stop_the_others(rig: FleetRig) -> None:
    first = rig.add_scale_set("pool-a")
    rig.add_scale_set("pool-b")
    rig.arm.add_fault(first, "403", count=-1)
    result = rig.once(fleet_target="fixed", fleet_vms="2")
    assert rig.alive("pool-b") == ["0", "1"] and rig.alive("pool-a") == []
    assert "forbidden" in result.stderr
    plan = rig.plan(fleet_target="fixed", fleet_vms="2")
    assert plan["scale_sets"][0]["reachable"] is False and plan["scale_sets"][0]["action"].startswith("skip: forbidden")
    status = rig.fleet("status", fleet_target="fixed", fleet_vms="2")
    assert status.returncode == 0 and "skip: forbidden" in status.stdout


def test_tag_target_reads_total_nodes_on_the_first_scale_set(rig: FleetRig) -> None:
    rig.add_scale_set("pool-a", tags={"TOTAL_NODES": "2"})
    rig.once(fleet_target="tag")
    assert rig.alive("pool-a") == ["0", "1"]


def test_plan_and_status_change_nothing(rig: FleetRig, queue: QueueClient) -> None:
    scale_set = rig.add_scale_set("pool-a")
    send(queue, 5)
    rig.fleet_queue().send_message(retire_message(f"{scale_set}/virtualMachines/0", "pool-a_0"))
    for args in (("plan", "--json"), ("plan",), ("status",), ("status", "--json")):
        assert rig.fleet(*args).returncode == 0
    assert writes(rig) == 0
    assert queue.get_queue_properties().approximate_message_count == 5
    assert len(list(queue.peek_messages(max_messages=32))) == 5
    assert len(list(rig.fleet_queue().peek_messages(max_messages=32))) == 1


def test_once_exits_0_after_one_pass_even_when_a_scale_set_cannot_be_reached(rig: FleetRig) -> None:
    rig.add_scale_set("pool-a")
    rig.scale_sets.append("/subscriptions/0/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/gone")
    result = rig.once(fleet_target="fixed", fleet_vms="1")
    assert result.stderr.count("pass done") == 1 and "not_found" in result.stderr
    assert rig.alive("pool-a") == ["0"]


@pytest.mark.parametrize(("key", "value"), [
    ("target", "autoscale"), ("messages_per_vm", "0"), ("min_vms", "-1"), ("max_vms", "1"), ("interval_s", "0"),
    ("on_deallocated", "ignore"), ("arm_endpoint", "http://management.azure.com"), ("client_id", "not-a-guid"),
    ("retire_when_idle_s", "-5"), ("scale_sets", "/subscriptions/x/resourceGroups/rg/virtualMachines/vm1"),
])
def test_bad_fleet_values_exit_78_naming_the_key(rig: FleetRig, key: str, value: str) -> None:
    rig.add_scale_set("pool-a")
    spot = {"fleet_min_vms": "2"} if key == "max_vms" else {}
    result = rig.fleet("run", "--once", **{**spot, f"fleet_{key}": value})
    assert result.returncode == os.EX_CONFIG
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"fleet.{key}" in lines[0], result.stderr


def test_fleet_without_scale_sets_exits_78(rig: FleetRig) -> None:
    result = rig.fleet("plan", fleet_scale_sets="")
    assert result.returncode == os.EX_CONFIG and "fleet.scale_sets: required" in result.stderr


def test_the_per_vm_service_never_imports_azure_mgmt() -> None:
    code = ("import sys, supervisor.cli, supervisor.service, supervisor.pool.arbiter\n"
            "parser = supervisor.cli.build_parser(); parser.parse_args(['run'])\n"
            "print(sorted(m for m in sys.modules if m.startswith(('azure.mgmt', 'supervisor.fleet.'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(result.stdout.replace("'", '"')) == ["supervisor.fleet.cli", "supervisor.fleet.settings"]


def test_an_idle_vm_asks_to_retire_holds_and_resumes_when_still_alive(start_evictable: Any, azurite: Azurite, queue: QueueClient,
                                                                      queue_name: str, tmp_path: Path) -> None:
    sup = start_evictable(scaling_workers="1", fleet_retire_when_idle_s="2")
    processes_sample_work(sup, queue, tmp_path, 2, 60, "work before going idle")
    fleet_queue = azurite.queue(f"{queue_name}-fleet")
    wait_until(lambda: sup.log().count("retire: asked on") == 1, 60, "a retire request")
    texts = [m.content for m in fleet_queue.peek_messages(max_messages=32)]
    assert len(texts) == 1
    request = json.loads(texts[0])
    assert request["kind"] == "retire" and request["vm_name"] == "vm-spot-07"
    assert request["resource_id"].endswith("/providers/Microsoft.Compute/virtualMachines/vm-spot-07")
    assert abs(request["at"] - time.time()) < 30
    sup.wait_for_log("resuming work", timeout=30)  # nobody deleted this VM: it works again
    processes_sample_work(sup, queue, tmp_path, 2, 60, "work after the hold")
