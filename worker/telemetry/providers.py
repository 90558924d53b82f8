"""OpenTelemetry for one process: traces, metrics and logs to Application Insights.

Call `setup_telemetry` in each process *after* it was forked, never before, and
`Telemetry.shutdown` on every clean exit. The providers are held by the
`Telemetry` object and never installed as OpenTelemetry globals, so a forked
child cannot trip over what it inherited from its parent.

Without a connection string nothing is exported and nothing touches the
network: the tracer and meter are OpenTelemetry's no-op ones, so the calling
code is the same and a message costs about two microseconds.

A `Telemetry` inherited across `os.fork` is inert in the child: its log handler
is detached and its exporters drop whatever the SDK's own after-fork threads
hand them, so the parent's buffered data is never sent twice or under the
child's name.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from worker.settings import TelemetrySettings
from worker.telemetry.exporters import (
    SHUTDOWN_THREAD,
    ForkSafeLogExporter,
    ForkSafeMetricExporter,
    ForkSafeSpanExporter,
    LogHandler,
    azure_exporters,
)

__all__ = ["MESSAGE_OUTCOMES", "Telemetry", "setup_telemetry"]

log = logging.getLogger(__name__)

SCOPE = "spot-supervisor"
METRIC_EXPORT_INTERVAL_MS = 60_000
MESSAGE_OUTCOMES = ("succeeded", "failed", "released", "interrupted", "poisoned", "lease_lost")
MESSAGING_SYSTEM = "azure_storage_queue"
# Seconds, for handler and drain durations (Application Insights keeps count/sum/min/max only).
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Telemetry:
    """Providers, the worker's instruments and hot-path helpers of one process. Build it with `setup_telemetry`.

    `meter` is there for the supervisor's own instruments (supervisor/pool/metrics.py)."""

    def __init__(self, settings: TelemetrySettings, role: str, attributes: Mapping[str, str] | None = None,
                 point_attributes: Mapping[str, str] | None = None) -> None:
        self.role = role
        # On every span and metric point too, not only on the resource (e.g. the GPU a worker is bound to),
        # so they are customDimensions of each request and metric in Application Insights.
        self.point_attributes = dict(point_attributes or {})
        self.pid = os.getpid()
        self.exporting = bool(settings.connection_string)
        self.resource = Resource.create({
            **(attributes or {}),
            "service.name": settings.service_name,
            "service.instance.id": f"{socket.gethostname()}:{self.pid}",
            "host.name": socket.gethostname(),
            "process.pid": self.pid,
            "spot.role": role,
        })
        self._lock = threading.Lock()
        self._closed = False
        self._log_handler: LogHandler | None = None

        self.tracer_provider: TracerProvider | None = None
        self.meter_provider: MeterProvider | None = None
        self.logger_provider: LoggerProvider | None = None
        if self.exporting:
            self.tracer_provider = TracerProvider(resource=self.resource, shutdown_on_exit=False)
            span_exporter, metric_exporter, log_exporter = azure_exporters(settings.connection_string, self.tracer_provider)
            self.tracer_provider.add_span_processor(BatchSpanProcessor(ForkSafeSpanExporter(span_exporter)))
            reader = PeriodicExportingMetricReader(ForkSafeMetricExporter(metric_exporter),
                                                   export_interval_millis=METRIC_EXPORT_INTERVAL_MS)
            self.meter_provider = MeterProvider(resource=self.resource, metric_readers=[reader], shutdown_on_exit=False)
            self.logger_provider = LoggerProvider(resource=self.resource, shutdown_on_exit=False)
            self.logger_provider.add_log_record_processor(BatchLogRecordProcessor(ForkSafeLogExporter(log_exporter)))
            own_level = max(logging.INFO, logging.getLevelName(settings.log_level.upper()))
            self._log_handler = LogHandler(self.logger_provider, own_level)
            logging.getLogger().addHandler(self._log_handler)
            atexit.register(_shutdown_at_exit, weakref.ref(self))
            os.register_at_fork(after_in_child=_abandon_in_child(weakref.ref(self)))
            self.tracer: trace.Tracer = self.tracer_provider.get_tracer(SCOPE)
            self.meter: metrics.Meter = self.meter_provider.get_meter(SCOPE)
        else:
            # The API's no-op tracer and meter: the same calls, well under a microsecond each, nothing leaves.
            self.tracer = trace.NoOpTracer()
            self.meter = metrics.NoOpMeter(SCOPE)
        m = self.meter
        self._processed = m.create_counter("spot.messages.processed", unit="{message}",
                                           description="Messages whose handling ended, by outcome")
        self._handler_duration = m.create_histogram("spot.handler.duration", unit="s", description="Handler run time",
                                                    explicit_bucket_boundaries_advisory=DURATION_BUCKETS_S)
        self._inflight = m.create_up_down_counter("spot.messages.inflight", unit="{message}",
                                                  description="Messages received and not yet settled")
        self._outcome_attrs = {o: {**self.point_attributes, "outcome": o} for o in MESSAGE_OUTCOMES}

    # -- hot path ---------------------------------------------------------------------------------

    def message_span(self, message_id: str, dequeue_count: int, queue: str) -> _MessageSpan:
        """`with telemetry.message_span(...) as span:` -- span "process message" (CONSUMER), current
        for the handler run. An exception that escapes the block is recorded on the span (status ERROR) and
        propagates; the consumer catches a handler's own exceptions and marks the span with mark_failed.
        """
        return _MessageSpan(self, {
            **self.point_attributes,
            "messaging.system": MESSAGING_SYSTEM,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": queue,
            "messaging.message.id": message_id,
            # Application Insights drops messaging.* from customDimensions; keep the useful ones.
            "spot.queue": queue,
            "spot.message.id": message_id,
            "spot.message.dequeue_count": dequeue_count,
        })

    def record_message(self, outcome: str, duration_s: float) -> None:
        """One message settled: counter spot.messages.processed and histogram spot.handler.duration."""
        attrs = self._outcome_attrs.get(outcome) or {**self.point_attributes, "outcome": outcome}
        self._processed.add(1, attrs)
        self._handler_duration.record(duration_s, attrs)

    def inflight(self, delta: int) -> None:
        self._inflight.add(delta, self.point_attributes)

    # -- lifecycle --------------------------------------------------------------------------------

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush and shut down every provider, within about timeout_s. Idempotent; never raises."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._detach_log_handler()
            if not self.exporting:
                return
            # Exports are HTTP calls that may hang on a dead network: never let them hold up an exit.
            closer = threading.Thread(target=self._close, args=(timeout_s,), name=SHUTDOWN_THREAD, daemon=True)
            closer.start()
            closer.join(timeout_s)
            if closer.is_alive():
                log.debug("telemetry shutdown still busy after %.1fs; not waiting", timeout_s)
        except Exception:  # never let telemetry break an exit
            log.debug("telemetry shutdown failed", exc_info=True)

    def _close(self, timeout_s: float) -> None:
        ms = int(timeout_s * 1000)
        tracer_provider, meter_provider, logger_provider = self.tracer_provider, self.meter_provider, self.logger_provider
        if tracer_provider is None or meter_provider is None or logger_provider is None:
            return
        steps: list[tuple[str, Any]] = [
            ("flush traces", lambda: tracer_provider.force_flush(ms)),
            ("flush logs", lambda: logger_provider.force_flush(ms)),
            ("shut down traces", tracer_provider.shutdown),
            ("shut down logs", logger_provider.shutdown),
            # The metric reader collects and exports once more when shut down: that is its flush.
            ("shut down metrics", lambda: meter_provider.shutdown(timeout_millis=ms)),
        ]
        for what, step in steps:
            try:
                step()
            except Exception:
                log.debug("telemetry: %s failed", what, exc_info=True)

    def _detach_log_handler(self) -> None:
        if self._log_handler is not None:
            logging.getLogger().removeHandler(self._log_handler)
            self._log_handler = None

    def _abandon(self) -> None:
        """In a forked child: this object belongs to the parent. Stop feeding it; never flush it."""
        self._closed = True
        self._detach_log_handler()


class _MessageSpan:
    """Context manager of `Telemetry.message_span` (a class, not a generator: it is on the hot path)."""

    __slots__ = ("_telemetry", "_attributes", "_span", "_token")

    def __init__(self, telemetry: Telemetry, attributes: dict[str, Any]) -> None:
        self._telemetry = telemetry
        self._attributes = attributes

    def __enter__(self) -> Span:
        span = self._telemetry.tracer.start_span("process message", kind=SpanKind.CONSUMER, attributes=self._attributes)
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))
        return span

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        span = self._span
        if exc is not None and span.is_recording():
            mark_failed(span, exc)
        otel_context.detach(self._token)
        span.end()


def mark_failed(span: Span, exc: BaseException) -> None:
    """Record a handler's exception on its span (the consumer catches it, so the span never sees it raised)."""
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def setup_telemetry(settings: TelemetrySettings, role: str, attributes: Mapping[str, str] | None = None,
                    point_attributes: Mapping[str, str] | None = None) -> Telemetry:
    """Telemetry for this process (call after fork). role: "supervisor" or "worker".

    attributes go on the resource (e.g. {"host.name": vm_name, "spot.vm.size": size, "spot.worker.index": "3"});
    point_attributes also on every message span and every point of the message metrics.
    Raises ConfigError for a connection string the exporter rejects.
    """
    _drop_inherited_handlers()
    return Telemetry(settings, role, attributes, point_attributes)


def _drop_inherited_handlers() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, LogHandler) and handler.pid != os.getpid():
            root.removeHandler(handler)


# -- fork and exit --------------------------------------------------------------------------------


def _abandon_in_child(ref: weakref.ref[Telemetry]) -> Any:
    def after_in_child() -> None:
        telemetry = ref()
        if telemetry is not None:
            telemetry._abandon()  # noqa: SLF001

    return after_in_child


def _shutdown_at_exit(ref: weakref.ref[Telemetry]) -> None:
    """Backstop for an exit that skipped shutdown(); only in the process that built the object."""
    telemetry = ref()
    if telemetry is not None and telemetry.pid == os.getpid():
        telemetry.shutdown(timeout_s=2.0)
