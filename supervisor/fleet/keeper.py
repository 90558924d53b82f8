"""The keeper: one pass = observe (queue, scale sets, retire requests), decide (pure), act (ARM writes);
`run_keeper` repeats it every interval_s. Nothing here schedules work: the scale sets do the rest.

Acting, in order per pass: delete failed (and, with on_deallocated = "replace", deallocated) instances,
start deallocated ones, grant retirements (delete exactly that instance, then its message), then add
the deficit to the first eligible scale set; an allocation failure cools that one down (growing, capped)
and moves what is left to the next. A scale set's error is reported and skipped, never raised.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from azure.storage.queue import QueueClient

from supervisor import sdnotify
from supervisor.config import SupervisorSettings
from supervisor.fleet.arm import ArmRefused, FleetArm
from supervisor.fleet.decide import Cooldown, Plan, ScaleSetPlan, next_cooldown, plan_pass
from supervisor.fleet.metrics import FleetMetrics
from supervisor.fleet.model import ScaleSetView
from supervisor.fleet.observe import (
    RetireInbox,
    fleet_queue,
    forget_message,
    peek_retire_requests,
    read_backlog,
    receive_retire_requests,
)
from supervisor.fleet.retire import DEFAULT_RETIRE_WINDOW_S, SeenRequests

log = logging.getLogger("supervisor.fleet")


@dataclass
class PassResult:
    plan: Plan
    inbox: RetireInbox
    added: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class Keeper:
    def __init__(self, settings: SupervisorSettings, arm: FleetArm, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.fleet = settings.fleet
        self.arm = arm
        self.clock = clock
        self.cooldowns: dict[str, Cooldown] = {}
        self.last_capacity: dict[str, int] = {}
        self.seen = SeenRequests()
        self.retire_window_s = self.fleet.retire_when_idle_s or DEFAULT_RETIRE_WINDOW_S
        self.metrics: FleetMetrics | None = None

    def look(self, inbox: RetireInbox | None = None) -> tuple[Plan, RetireInbox]:
        """Observe and decide, changing nothing (plan, status; and the first half of a pass)."""
        backlog = read_backlog(self.settings.queue)
        views = [self._read(scale_set_id) for scale_set_id in self.fleet.scale_sets]
        if inbox is None:
            inbox = peek_retire_requests(self.settings.queue)
        plan = plan_pass(self.fleet, backlog, views, self.cooldowns, inbox.requests, self.clock(), self.retire_window_s)
        return plan, inbox

    def run_pass(self, retire_queue: QueueClient | None) -> PassResult:
        inbox = receive_retire_requests(retire_queue) if retire_queue is not None else RetireInbox([], [])
        fresh = [r for r in inbox.requests if self.seen.check_and_add(r)]
        replayed = [r for r in inbox.requests if r not in fresh]
        plan, inbox = self.look(RetireInbox(fresh, inbox.rejected, inbox.error))
        result = PassResult(plan, inbox)
        for request in replayed:
            log.warning("fleet: retire request for %s at %s replayed: ignored", request.resource_id[:200], request.at)
            if retire_queue is not None:
                forget_message(retire_queue, request.message_id, request.pop_receipt)
        if inbox.error:
            result.problems.append(inbox.error)
            log.warning("fleet: retire requests could not be read: %s", inbox.error)
        for message_id, receipt, why in inbox.rejected:
            log.warning("fleet: message %s on the fleet queue is no retire request (%s): deleted", message_id, why)
            if retire_queue is not None:
                forget_message(retire_queue, message_id, receipt)
        for p in plan.scale_sets:
            if not p.view.reachable:
                result.problems.append(f"{p.view.name}: {p.view.error_kind}: {p.view.error}")
                continue
            self._repair(p, result)
        self._retire(plan, retire_queue, result)
        self._add(plan, result)
        if self.metrics is not None:
            self.metrics.record_pass(result.plan)
        return result

    # -- acting ---------------------------------------------------------------

    def _repair(self, p: ScaleSetPlan, result: PassResult) -> None:
        if p.delete:
            try:
                self.arm.delete_instances(p.view.id, p.delete)
                log.info("fleet: %s: deleted %s (failed or deallocated), to be replaced", p.view.name, ", ".join(p.delete))
                if self.metrics is not None:
                    self.metrics.replaced.add(len(p.delete), {"scale_set": p.view.name})
            except ArmRefused as exc:
                result.problems.append(str(exc))
                log.warning("fleet: delete failed: %s", exc)
        if p.start:
            try:
                self.arm.start_instances(p.view.id, p.start)
                log.info("fleet: %s: started %s again (deallocated by eviction)", p.view.name, ", ".join(p.start))
                if self.metrics is not None:
                    self.metrics.restored.add(len(p.start), {"scale_set": p.view.name})
            except ArmRefused as exc:
                self._refused(p.view, exc, result)

    def _retire(self, plan: Plan, retire_queue: QueueClient | None, result: PassResult) -> None:
        for decision in plan.retirements:
            request = decision.request
            if decision.granted:
                try:
                    self.arm.delete_instances(decision.scale_set_id, [decision.instance_id])
                except ArmRefused as exc:  # the message comes back after its lease; a later pass tries again
                    self.seen.forget(request)
                    result.problems.append(str(exc))
                    log.warning("fleet: retiring %s failed: %s", request.vm_name, exc)
                    continue
                log.info("fleet: retired %s (%s): %s", request.vm_name, request.resource_id, decision.reason)
                if self.metrics is not None:
                    self.metrics.retired.add(1, {"scale_set": decision.scale_set_id.rsplit("/", 1)[-1]})
            else:
                log.info("fleet: retire request of %s refused: %s", request.vm_name[:80], decision.reason)
            if retire_queue is not None:
                forget_message(retire_queue, request.message_id, request.pop_receipt)

    def _add(self, plan: Plan, result: PassResult) -> None:
        remaining = plan.deficit
        for p in plan.add_order():
            if remaining <= 0:
                break
            before = self._read(p.view.id)
            if not before.reachable or before.capacity is None:
                result.problems.append(f"{p.view.name}: {before.error_kind}: {before.error}")
                continue
            try:
                self.arm.set_capacity(p.view.id, before.capacity + remaining)
                log.info("fleet: %s: capacity %d -> %d", p.view.name, before.capacity, before.capacity + remaining)
                result.added[p.view.id] = remaining
                self.cooldowns.pop(p.view.id, None)
                remaining = 0
            except ArmRefused as exc:
                after = self._read(p.view.id)
                got = max(0, (after.capacity or before.capacity) - before.capacity) if after.reachable else 0
                if got:
                    result.added[p.view.id] = got
                remaining -= got
                self._refused(p.view, exc, result)
                if remaining > 0:
                    log.info("fleet: %d still wanted: trying the next scale set", remaining)
        if remaining > 0:
            result.problems.append(f"{remaining} VMs wanted that no scale set could take this pass")

    def _refused(self, view: ScaleSetView, exc: ArmRefused, result: PassResult) -> None:
        result.problems.append(str(exc))
        if exc.allocation:
            cooldown = next_cooldown(self.cooldowns.get(view.id), self.clock(), self.fleet, exc.code)
            self.cooldowns[view.id] = cooldown
            log.warning("fleet: %s refused the allocation (%s): cooling down %.0fs", view.name, exc, cooldown.delay_s)
            if self.metrics is not None:
                self.metrics.allocation_failures.add(1, {"scale_set": view.name, "code": exc.code})
        else:
            log.warning("fleet: %s", exc)

    def _read(self, scale_set_id: str) -> ScaleSetView:
        view = self.arm.read(scale_set_id)
        if view.reachable and view.capacity is not None:
            self.last_capacity[scale_set_id] = view.capacity
        elif scale_set_id in self.last_capacity:
            view = ScaleSetView(view.id, self.last_capacity[scale_set_id], error_kind=view.error_kind, error=view.error)
        return view


def run_keeper(settings: SupervisorSettings, arm: FleetArm, once: bool, metrics_factory: Callable[[], Any] | None = None) -> int:
    """The loop: a pass every interval_s until SIGTERM/SIGINT. `once`: one pass, exit 0 (errors reported)."""
    keeper = Keeper(settings, arm)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    if metrics_factory is not None:
        keeper.metrics = metrics_factory()
    retire_queue: QueueClient | None = None
    sdnotify.ready("fleet keeper: first pass")
    while True:
        started = time.monotonic()
        try:
            if retire_queue is None:
                retire_queue = fleet_queue(settings.queue)
        except Exception as exc:  # the queue is down: keep the fleet going, retire requests wait
            log.warning("fleet: the fleet queue is unavailable (%s); retire requests wait", exc)
        result = keeper.run_pass(retire_queue)
        plan = result.plan
        summary = (f"target {plan.target}, alive {plan.alive}, backlog {plan.backlog.visible} visible + "
                   f"{plan.backlog.in_flight} in flight, added {sum(result.added.values())}")
        log.info("fleet: pass done: %s%s", summary, f"; problems: {'; '.join(result.problems)}" if result.problems else "")
        sdnotify.status(f"fleet: {summary}")
        if once or stop.wait(max(0.0, settings.fleet.interval_s - (time.monotonic() - started))):
            break
    sdnotify.stopping()
    return 0
