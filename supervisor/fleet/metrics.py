"""The keeper's OpenTelemetry metrics: the last pass's facts as gauges, what it did as counters."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from supervisor.fleet.decide import Plan


class FleetMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._last: Plan | None = None
        self.restored = meter.create_counter("spot.fleet.restored", unit="{vm}", description="Deallocated instances started again")
        self.replaced = meter.create_counter("spot.fleet.replaced", unit="{vm}",
                                             description="Failed (or deallocated, when so configured) instances deleted to be replaced")
        self.retired = meter.create_counter("spot.fleet.retired", unit="{vm}", description="Idle VMs deleted at their request")
        self.allocation_failures = meter.create_counter("spot.fleet.allocation_failures", unit="{refusal}",
                                                        description="Allocations refused (capacity, quota), per scale set")
        for name, description, read in (
                ("spot.fleet.target", "VMs the fleet should have", lambda p: [(p.target, {})]),
                ("spot.fleet.backlog", "Messages on the queue, visible and in flight",
                 lambda p: [(p.backlog.visible, {"state": "visible"}), (p.backlog.in_flight, {"state": "in_flight"})]),
                ("spot.fleet.running", "Running instances, per scale set", lambda p: _per_set(p, "running")),
                ("spot.fleet.starting", "Starting instances, per scale set", lambda p: _per_set(p, "starting")),
                ("spot.fleet.evicted", "Deallocated (evicted) instances, per scale set", lambda p: _per_set(p, "deallocated"))):
            meter.create_observable_gauge(name, callbacks=[self._callback(read)], unit="{vm}", description=description)

    def _callback(self, read: Any) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            last = self._last
            return [] if last is None else [Observation(value, attributes) for value, attributes in read(last)]

        return observe

    def record_pass(self, plan: Plan) -> None:
        self._last = plan


def _per_set(plan: Plan, state: str) -> list[tuple[int, dict[str, str]]]:
    return [(s.view.count(state), {"scale_set": s.view.name}) for s in plan.scale_sets if s.view.reachable]
