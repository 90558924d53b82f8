"""One reconcile pass as pure logic: the facts (backlog, scale sets, cool-downs, retire requests) in,
the plan out. No I/O here; `keeper` carries the plan out and `report` shows it.

The rules:
- target: "queue" = ceil((visible + in-flight) / messages_per_vm), so it never shrinks below what is
  in flight; "fixed" = vms; "tag" = TOTAL_NODES on the first scale set. Then bounded by min_vms..max_vms.
- an instance in a failed provisioning state, or reported unhealthy, is deleted (and so replaced);
  a deallocated (evicted) one is started again or deleted and replaced, per on_deallocated;
- the deficit to the target goes to the first scale set that is reachable and not cooling down; at run
  time an allocation failure moves what is left to the next one (`keeper`);
- never more than max_vms in total; scale-in only by retirement: an idle VM that asked is deleted unless
  that leaves fewer than max(target, min_vms).
- a scale set that cannot be read counts with its last known capacity (so a 403 never causes the
  others to grow past max_vms) and is skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from supervisor.fleet.model import Backlog, InstanceView, RetireRequest, ScaleSetView, tag_target
from supervisor.fleet.settings import FleetSettings


@dataclass(frozen=True)
class Cooldown:
    until: float  # time.time()
    delay_s: float
    reason: str = ""


def next_cooldown(previous: Cooldown | None, now: float, settings: FleetSettings, reason: str) -> Cooldown:
    """A refused allocation: the first cool-down is allocation_cooldown_s, each further one doubles, capped."""
    delay = settings.allocation_cooldown_s if previous is None else min(previous.delay_s * 2, settings.allocation_cooldown_max_s)
    return Cooldown(now + delay, delay, reason)


@dataclass
class ScaleSetPlan:
    view: ScaleSetView
    start: list[str] = field(default_factory=list)  # deallocated instances to start
    delete: list[str] = field(default_factory=list)  # failed (or deallocated, to replace) instances to delete
    retire: list[str] = field(default_factory=list)  # instances whose retire request is granted
    add: int = 0  # the deficit, planned here (first eligible scale set)
    eligible: bool = True  # may take new instances this pass
    note: str = ""

    @property
    def action(self) -> str:
        if not self.view.reachable:
            return f"skip: {self.view.error_kind}: {self.view.error}"
        parts = []
        if self.delete:
            parts.append(f"replace {len(self.delete)} ({', '.join(self.delete)})")
        if self.start:
            parts.append(f"start {len(self.start)} deallocated ({', '.join(self.start)})")
        if self.retire:
            parts.append(f"retire {', '.join(self.retire)}")
        if self.add:
            parts.append(f"add {self.add}")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts) or "none"


@dataclass(frozen=True)
class RetireDecision:
    request: RetireRequest
    granted: bool
    reason: str
    scale_set_id: str = ""
    instance_id: str = ""


@dataclass
class Plan:
    backlog: Backlog
    target: int
    target_reason: str
    alive: int  # running + starting now
    after: int  # alive once the plan is carried out (before any allocation failure)
    scale_sets: list[ScaleSetPlan]
    retirements: list[RetireDecision]
    deficit: int  # instances to add in total

    def add_order(self) -> list[ScaleSetPlan]:
        """Where the deficit may go, in preference order: the planned one first, then the fall-backs."""
        return [p for p in self.scale_sets if p.eligible]


def compute_target(settings: FleetSettings, backlog: Backlog, first: ScaleSetView | None, alive: int) -> tuple[int, str]:
    if settings.target == "fixed":
        wanted, why = settings.vms, f"fixed: vms = {settings.vms}"
    elif settings.target == "tag":
        tagged = tag_target(first) if first is not None and first.reachable else None
        if tagged is None:
            wanted, why = alive, "tag: TOTAL_NODES missing, unreadable or not a whole number: keeping the current size"
        else:
            wanted, why = tagged, f"tag: TOTAL_NODES = {tagged}"
    else:
        wanted = math.ceil(backlog.total / settings.messages_per_vm)
        why = (f"queue: ceil(({backlog.visible} visible + {backlog.in_flight} in flight) / "
               f"{settings.messages_per_vm} messages per VM) = {wanted}")
    bounded = max(settings.min_vms, min(settings.max_vms, wanted))
    if bounded != wanted:
        why += f", bounded to {bounded} (min_vms {settings.min_vms}, max_vms {settings.max_vms})"
    return bounded, why


def plan_pass(settings: FleetSettings, backlog: Backlog, views: Sequence[ScaleSetView],
              cooldowns: Mapping[str, Cooldown], retire_requests: Sequence[RetireRequest], now: float,
              retire_window_s: float) -> Plan:
    plans = [ScaleSetPlan(view) for view in views]
    alive = 0
    after = 0
    for p in plans:
        view = p.view
        cooling = cooldowns.get(view.id)
        if cooling is not None and cooling.until > now:
            p.eligible = False
            p.note = f"cooling down {cooling.until - now:.0f}s more ({cooling.reason})"
        if not view.reachable:
            p.eligible = False
            after += view.capacity or 0  # unknown instances: assume they are still there
            alive += view.capacity or 0
            continue
        for instance in view.instances:
            state = instance.state
            if state in ("running", "starting"):
                alive += 1
                after += 1
            elif state == "failed":
                p.delete.append(instance.instance_id)
            elif state == "deallocated":
                if settings.on_deallocated == "restart" and p.eligible:
                    p.start.append(instance.instance_id)
                    after += 1
                elif settings.on_deallocated == "replace":
                    p.delete.append(instance.instance_id)
                else:
                    after += 1  # cooling down: left deallocated for now, still counted in the capacity
    target, why = compute_target(settings, backlog, views[0] if views else None, alive)
    deficit = max(0, min(target, settings.max_vms) - after)
    first = next((p for p in plans if p.eligible), None)
    if first is not None and deficit:
        first.add = deficit
    elif deficit:
        why += f"; {deficit} more wanted but no scale set can take them now"
        deficit = 0
    after += deficit
    decisions = _decide_retirements(settings, plans, retire_requests, target, after, now, retire_window_s)
    after -= sum(1 for d in decisions if d.granted)
    return Plan(backlog, target, why, alive, after, plans, decisions, deficit)


def _decide_retirements(settings: FleetSettings, plans: list[ScaleSetPlan], requests: Sequence[RetireRequest],
                        target: int, after: int, now: float, window_s: float) -> list[RetireDecision]:
    by_resource: dict[str, tuple[ScaleSetPlan, InstanceView]] = {}
    for p in plans:
        for instance in p.view.instances:
            by_resource[instance.resource_id.lower()] = (p, instance)
    floor = max(target, settings.min_vms)
    decisions: list[RetireDecision] = []
    granted_ids: set[str] = set()
    for request in requests:
        found = by_resource.get(request.resource_id.lower())
        if found is None:
            decisions.append(RetireDecision(request, False, "not an instance of our scale sets (or already gone)"))
            continue
        p, instance = found
        where = {"scale_set_id": p.view.id, "instance_id": instance.instance_id}
        if instance.name != request.vm_name:
            decisions.append(RetireDecision(request, False, f"vm_name {request.vm_name[:80]!r} is not {instance.name!r}", **where))
        elif instance.resource_id.lower() in granted_ids:
            decisions.append(RetireDecision(request, False, "a duplicate of a request granted in this pass", **where))
        elif request.at > now + 60:
            decisions.append(RetireDecision(request, False, "asked in the future (clock skew or forged)", **where))
        elif now - request.at > window_s * 0.9:
            decisions.append(RetireDecision(request, False, f"stale: asked {now - request.at:.0f}s ago, the VM resumes work "
                                            f"after {window_s:g}s", **where))
        elif instance.state != "running":
            decisions.append(RetireDecision(request, False, f"the instance is {instance.state}, not running", **where))
        elif after - 1 < floor:
            decisions.append(RetireDecision(request, False, f"needed: {after} VMs, the floor is {floor} "
                                            f"(target {target}, min_vms {settings.min_vms})", **where))
        else:
            after -= 1
            granted_ids.add(instance.resource_id.lower())
            p.retire.append(instance.instance_id)
            decisions.append(RetireDecision(request, True, "idle and not needed", **where))
    return decisions
