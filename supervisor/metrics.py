"""The supervisor's own metrics, on the meter of its process's `Telemetry` (a no-op meter when not exporting)."""

from __future__ import annotations

from opentelemetry import metrics

from worker.telemetry import DURATION_BUCKETS_S


class SupervisorMetrics:
    def __init__(self, meter: metrics.Meter) -> None:
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
