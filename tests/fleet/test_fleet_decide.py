"""The reconcile pass's pure logic (supervisor/fleet/decide.py) and the retire-request parser: facts in, plan out."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

from supervisor.fleet.decide import Cooldown, next_cooldown, plan_pass
from supervisor.fleet.model import Backlog, InstanceView, RetireRequest, ScaleSetView, parse_instance
from supervisor.fleet.retire import SeenRequests, parse_retire, retire_message
from supervisor.fleet.settings import FleetSettings

A = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/a"
B = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/b"
NOW = 1_000_000.0


def vm(scale_set: str, n: int, power: str = "running", provisioning: str = "succeeded", healthy: bool | None = None) -> InstanceView:
    name = scale_set.rsplit("/", 1)[-1]
    return InstanceView(str(n), f"{name}_{n}", f"{scale_set}/virtualMachines/{n}", provisioning, power, healthy)


def view(scale_set: str, *instances: InstanceView) -> ScaleSetView:
    return ScaleSetView(scale_set, len(instances), instances=instances)


def test_queue_target_counts_in_flight_and_is_bounded() -> None:
    settings = FleetSettings(scale_sets=(A,), messages_per_vm=10, min_vms=1, max_vms=4)
    assert plan_pass(settings, Backlog(0, 21), [view(A)], {}, [], NOW, 300).target == 3
    assert plan_pass(settings, Backlog(0, 0), [view(A)], {}, [], NOW, 300).target == 1
    plan = plan_pass(settings, Backlog(500, 0), [view(A)], {}, [], NOW, 300)
    assert plan.target == 4 and plan.deficit == 4 and "bounded to 4" in plan.target_reason


def test_deficit_goes_to_the_first_eligible_scale_set_and_skips_cooling_ones() -> None:
    settings = FleetSettings(scale_sets=(A, B), target="fixed", vms=3, max_vms=10)
    plan = plan_pass(settings, Backlog(0, 0), [view(A, vm(A, 0)), view(B)], {}, [], NOW, 300)
    assert [p.add for p in plan.scale_sets] == [2, 0] and [p.view.id for p in plan.add_order()] == [A, B]
    cooling = {A: Cooldown(NOW + 30, 60, "AllocationFailed")}
    plan = plan_pass(settings, Backlog(0, 0), [view(A, vm(A, 0)), view(B)], cooling, [], NOW, 300)
    assert [p.add for p in plan.scale_sets] == [0, 2] and "cooling down 30s" in plan.scale_sets[0].action


def test_cooldown_grows_and_is_capped() -> None:
    settings = FleetSettings(allocation_cooldown_s=10, allocation_cooldown_max_s=35)
    delays = []
    previous = None
    for _ in range(4):
        previous = next_cooldown(previous, NOW, settings, "AllocationFailed")
        delays.append(previous.delay_s)
    assert delays == [10, 20, 35, 35] and previous is not None and previous.until == NOW + 35


def test_unreachable_scale_set_counts_with_its_last_capacity_so_max_vms_holds() -> None:
    settings = FleetSettings(scale_sets=(A, B), target="fixed", vms=5, max_vms=5)
    down = ScaleSetView(A, 3, error_kind="forbidden", error="403 AuthorizationFailed")
    plan = plan_pass(settings, Backlog(0, 0), [down, view(B)], {}, [], NOW, 300)
    assert [p.add for p in plan.scale_sets] == [0, 2] and plan.scale_sets[0].action.startswith("skip: forbidden")


def test_failed_unhealthy_and_deallocated_instances() -> None:
    instances = (vm(A, 0, provisioning="failed"), vm(A, 1, healthy=False), vm(A, 2, power="deallocated"), vm(A, 3))
    restart = plan_pass(FleetSettings(target="fixed", vms=4), Backlog(0, 0), [view(A, *instances)], {}, [], NOW, 300)
    assert restart.scale_sets[0].delete == ["0", "1"] and restart.scale_sets[0].start == ["2"] and restart.deficit == 2
    replace = plan_pass(FleetSettings(target="fixed", vms=4, on_deallocated="replace"), Backlog(0, 0), [view(A, *instances)],
                        {}, [], NOW, 300)
    assert replace.scale_sets[0].delete == ["0", "1", "2"] and replace.scale_sets[0].start == [] and replace.deficit == 3


def test_retirement_only_above_the_floor_and_only_for_a_matching_fresh_request() -> None:
    settings = FleetSettings(target="fixed", vms=1, min_vms=1)
    fleet = [view(A, vm(A, 0), vm(A, 1), vm(A, 2))]

    def request(n: int, name: str | None = None, at: float = NOW - 5) -> RetireRequest:
        return RetireRequest(f"{A}/virtualMachines/{n}", name or f"a_{n}", at)

    decisions = plan_pass(settings, Backlog(0, 0), fleet, {}, [request(0), request(1), request(2)], NOW, 300).retirements
    assert [d.granted for d in decisions] == [True, True, False] and "the floor is 1" in decisions[2].reason
    odd = [request(0, name="a_1"), request(1, at=NOW - 290), request(2, at=NOW + 3600), request(9),
           RetireRequest(f"{B}/virtualMachines/0", "b_0", NOW)]
    reasons = [d.reason for d in plan_pass(settings, Backlog(0, 0), fleet, {}, odd, NOW, 300).retirements]
    assert ["is not 'a_0'" in reasons[0], "stale" in reasons[1], "future" in reasons[2], "not an instance" in reasons[3],
            "not an instance" in reasons[4]] == [True] * 5


def test_parse_retire_refuses_what_is_not_a_retire_request() -> None:
    good = retire_message(f"{A}/virtualMachines/1", "a_1", at=NOW)
    assert parse_retire(good) == RetireRequest(f"{A}/virtualMachines/1", "a_1", NOW)
    for bad in (None, "", "x" * 5000, "[" * 2000 + "]" * 2000, "[]", json.dumps({"kind": "retire"}),
                json.dumps({"kind": "shutdown", "resource_id": A, "vm_name": "a", "at": NOW}),
                json.dumps({"kind": "retire", "resource_id": 7, "vm_name": "a", "at": NOW}),
                json.dumps({"kind": "retire", "resource_id": A, "vm_name": "", "at": NOW}),
                json.dumps({"kind": "retire", "resource_id": A, "vm_name": "a", "at": True}),
                '{"kind": "retire", "resource_id": "/subscriptions/x", "vm_name": "a", "at": NaN}'):
        assert isinstance(parse_retire(bad), str), bad


def test_seen_requests_catch_replays() -> None:
    seen = SeenRequests(limit=2)
    first = RetireRequest(f"{A}/virtualMachines/1", "a_1", NOW)
    assert seen.check_and_add(first) and not seen.check_and_add(first)
    assert seen.check_and_add(RetireRequest(first.resource_id.upper(), "a_1", NOW + 1))
    seen.forget(first)  # its delete failed: the request, back after its lease, is acted on again
    assert seen.check_and_add(first)


def test_parse_instance_reads_power_provisioning_and_health() -> None:
    item = {"instanceId": "3", "name": "a_3", "properties": {"provisioningState": "Succeeded", "instanceView": {
        "statuses": [{"code": "ProvisioningState/succeeded"}, {"code": "PowerState/deallocated"}],
        "vmHealth": {"status": {"code": "HealthState/unhealthy"}}}}}
    parsed = parse_instance(A, item)
    assert (parsed.resource_id, parsed.power, parsed.healthy, parsed.state) == (f"{A}/virtualMachines/3", "deallocated", False, "failed")


def test_retirement_asks_after_idle_holds_then_resumes(monkeypatch: Any) -> None:
    from supervisor.pool.retirement import Retirement
    from worker.settings import QueueSettings

    now = [100.0]
    asked: list[float] = []
    monkeypatch.setattr(Retirement, "_ask", lambda self, at: asked.append(at))
    retirement = Retirement(10, QueueSettings(), f"{A}/virtualMachines/1", "a_1", clock=lambda: now[0])
    idle = [SimpleNamespace(ready=True, retiring=False, stats={"running": 0, "held": 0})]
    busy = [SimpleNamespace(ready=True, retiring=False, stats={"running": 1, "held": 1})]
    stops: list[int] = []
    assert not retirement.tick(idle, False, lambda: stops.append(1))
    now[0] = 105.0
    retirement.tick(busy, False, lambda: stops.append(1))  # work arrived: the idle clock starts over
    now[0] = 106.0
    retirement.tick(idle, False, lambda: stops.append(1))
    now[0] = 115.0
    retirement.tick(idle, False, lambda: stops.append(1))
    assert stops == [] and not retirement.holding
    now[0] = 116.5
    retirement.tick(idle, False, lambda: stops.append(1))
    time.sleep(0.1)  # the request is posted off the main loop
    assert stops == [1] and retirement.holding and asked == [116.5] and "retiring" in retirement.status()
    now[0] = 126.0
    assert not retirement.tick([], False, lambda: stops.append(1))
    now[0] = 126.6
    assert retirement.tick([], False, lambda: stops.append(1)) and not retirement.holding  # still here: resume
    retirement.asked_at = 130.0
    assert retirement.tick([], True, lambda: stops.append(1)) and not retirement.holding  # a drain takes over
