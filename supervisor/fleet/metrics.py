"""The keeper's OpenTelemetry metrics: the last pass's facts as gauges, what it did as counters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

if TYPE_CHECKING:
    from supervisor.fleet.decide import Cooldown
    from supervisor.fleet.keeper import PassResult


class FleetMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._last: PassResult | None = None
        self.restored = meter.create_counter("spot.fleet.restored", unit="{vm}", description="Deallocated instances started again")
        self.replaced = meter.create_counter("spot.fleet.replaced", unit="{vm}",
                                             description="Failed (or deallocated, when so configured) instances deleted to be replaced")
        self.retired = meter.create_counter("spot.fleet.retired", unit="{vm}", description="Idle VMs deleted at their request")
        self.allocation_failures = meter.create_counter("spot.fleet.allocation_failures", unit="{refusal}",
                                                        description="Allocations refused (capacity, quota), per scale set")
        for name, description, read in (
                ("spot.fleet.target", "VMs the fleet should have", lambda r: [(r.plan.target, {})]),
                ("spot.fleet.backlog", "Messages on the queue, visible and in flight",
                 lambda r: [(r.plan.backlog.visible, {"state": "visible"}), (r.plan.backlog.in_flight, {"state": "in_flight"})]),
                ("spot.fleet.running", "Running instances, per scale set", lambda r: _per_set(r, "running")),
                ("spot.fleet.starting", "Starting instances, per scale set", lambda r: _per_set(r, "starting")),
                ("spot.fleet.evicted", "Deallocated (evicted) instances, per scale set", lambda r: _per_set(r, "deallocated"))):
            meter.create_observable_gauge(name, callbacks=[self._callback(read)], unit="{vm}", description=description)

    def _callback(self, read: Any) -> Any:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            last = self._last
            return [] if last is None else [Observation(value, attributes) for value, attributes in read(last)]

        return observe

    def record_pass(self, result: PassResult, cooldowns: Mapping[str, Cooldown]) -> None:
        self._last = result


def _per_set(result: PassResult, state: str) -> list[tuple[int, dict[str, str]]]:
    return [(p.view.count(state), {"scale_set": p.view.name}) for p in result.plan.scale_sets if p.view.reachable]
