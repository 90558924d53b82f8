"""The supervisor's own metrics, on the meter of its process's `Telemetry` (a no-op meter when not exporting)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

from worker.telemetry.providers import DURATION_BUCKETS_S

if TYPE_CHECKING:
    from supervisor.ops.cost import CostTracker


class SupervisorMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
        self._meter = meter
        self._drain_duration = meter.create_histogram("spot.drain.duration", unit="s", description="Drain start to idle",
                                                      explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._eviction_notices = meter.create_counter("spot.eviction.notices", unit="{event}",
                                                      description="Scheduled Events for this VM that start a drain")
        self._respawns = meter.create_counter("spot.worker.respawns", unit="{process}",
                                              description="Worker processes started again after they exited")

    def record_drain(self, duration_s: float, reason: str) -> None:
        self._drain_duration.record(duration_s, {"reason": reason})

    def record_eviction_notice(self, event_type: str) -> None:
        self._eviction_notices.add(1, {"event_type": event_type})

    def record_worker_respawn(self, reason: str = "exited") -> None:
        self._respawns.add(1, {"reason": reason})

    def observe_cost(self, cost: CostTracker, completed: Callable[[], int]) -> None:
        """Prices, dollars saved and cost per completed message, read at each export (none until prices are known)."""

        def attributes() -> dict[str, str]:
            quote = cost.quote
            return {"sku": quote.sku, "region": quote.region} if quote else {}

        def spot(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cost.quote.spot_usd_per_hour, attributes())] if cost.quote else []

        def on_demand(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cost.quote.on_demand_usd_per_hour, attributes())] if cost.quote else []

        def saved(options: CallbackOptions) -> Iterable[Observation]:
            value = cost.saved_usd()
            return [Observation(value, attributes())] if value is not None else []

        def per_message(options: CallbackOptions) -> Iterable[Observation]:
            value = cost.usd_per_message(completed())
            return [Observation(value, attributes())] if value is not None else []

        m = self._meter
        m.create_observable_gauge("spot.price.spot", [spot], unit="USD/h", description="Linux Spot price of this VM size")
        m.create_observable_gauge("spot.price.on_demand", [on_demand], unit="USD/h",
                                  description="Linux pay-as-you-go price of this VM size")
        m.create_observable_counter("spot.cost.saved", [saved], unit="USD",
                                    description="Uptime x (pay-as-you-go - Spot price) since the supervisor started")
        m.create_observable_gauge("spot.cost.per_message", [per_message], unit="USD",
                                  description="Uptime x Spot price / messages completed since the supervisor started")
