"""What leaves the process: the Azure Monitor exporters, wrapped so a forked child drops what it
inherited, and the root-logger handler that turns log records into OpenTelemetry log records."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from time import time_ns
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from worker.settings import ConfigError

# Our own loggers: exported from INFO (or telemetry.log_level if higher); everything else from WARNING.
OWN_LOGGERS = ("supervisor", "worker")
# The exporter's own switches: statsbeat / SDK stats are extra metrics and threads that phone Microsoft,
# the control plane polls settings.sdk.monitor.azure.com. Off unless the operator set them explicitly.
EXPORTER_ENV_DEFAULTS = {
    "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true",
    "APPLICATIONINSIGHTS_SDKSTATS_DISABLED": "true",
    "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true",
}
# Log records from these never go back into the log exporter (no feedback loop on export errors).
_QUIET_LOGGERS = ("opentelemetry", "azure.monitor.opentelemetry")
SHUTDOWN_THREAD = "spot-telemetry-shutdown"
_EXPORT_THREADS = ("OtelBatch", "OtelPeriodicExportingMetricReader", SHUTDOWN_THREAD)


def azure_exporters(connection_string: str, tracer_provider: TracerProvider) -> tuple[SpanExporter, MetricExporter, LogRecordExporter]:
    from azure.core.pipeline.policies import SansIOHTTPPolicy
    from azure.monitor.opentelemetry.exporter import (
        AzureMonitorLogExporter,
        AzureMonitorMetricExporter,
        AzureMonitorTraceExporter,
    )

    for name, value in EXPORTER_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    # Its INFO lines ("Transmission succeeded ...") would otherwise reach stderr after every export.
    exporter_logger = logging.getLogger("azure.monitor.opentelemetry.exporter")
    if exporter_logger.level == logging.NOTSET:
        exporter_logger.setLevel(logging.WARNING)
    options: dict[str, Any] = {
        "disable_offline_storage": True,  # no retry files under /tmp: a Spot VM's disk goes with it
        "timeout": 10.0,  # connection timeout, and the total time budget of azure-core's HTTP retries
        "retry_total": 3,
        "http_logging_policy": SansIOHTTPPolicy(),  # no INFO lines per request from azure.core
    }
    try:
        return (
            # Without tracer_provider it looks up the *global* provider for the resource on every export.
            AzureMonitorTraceExporter.from_connection_string(connection_string, tracer_provider=tracer_provider, **options),
            AzureMonitorMetricExporter.from_connection_string(connection_string, **options),
            AzureMonitorLogExporter.from_connection_string(connection_string, **options),
        )
    except ValueError as exc:
        raise ConfigError("telemetry.connection_string",
                          f"not a valid Application Insights connection string ({exc})") from None


class ForkSafeSpanExporter(SpanExporter):
    def __init__(self, inner: SpanExporter) -> None:
        self._inner, self._pid = inner, os.getpid()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self._inner.export(spans) if os.getpid() == self._pid else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis) if os.getpid() == self._pid else True


class ForkSafeMetricExporter(MetricExporter):
    def __init__(self, inner: MetricExporter) -> None:
        super().__init__(preferred_temporality=inner._preferred_temporality,  # noqa: SLF001 - the reader reads these too
                         preferred_aggregation=inner._preferred_aggregation)  # noqa: SLF001
        self._inner, self._pid = inner, os.getpid()

    def export(self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any) -> MetricExportResult:
        if os.getpid() != self._pid:
            return MetricExportResult.SUCCESS
        return self._inner.export(metrics_data, timeout_millis=timeout_millis, **kwargs)

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return self._inner.force_flush(timeout_millis) if os.getpid() == self._pid else True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown(timeout_millis=timeout_millis, **kwargs)


class ForkSafeLogExporter(LogRecordExporter):
    def __init__(self, inner: LogRecordExporter) -> None:
        self._inner, self._pid = inner, os.getpid()

    def export(self, batch: Sequence[Any]) -> LogRecordExportResult:
        return self._inner.export(batch) if os.getpid() == self._pid else LogRecordExportResult.SUCCESS

    def shutdown(self) -> None:
        if os.getpid() == self._pid:
            self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis) if os.getpid() == self._pid else True


# -- logs -----------------------------------------------------------------------------------------

_SEVERITY = {logging.DEBUG: SeverityNumber.DEBUG, logging.INFO: SeverityNumber.INFO, logging.WARNING: SeverityNumber.WARN,
             logging.ERROR: SeverityNumber.ERROR, logging.CRITICAL: SeverityNumber.FATAL}
_SEVERITY_TEXT = {"WARNING": "WARN", "CRITICAL": "FATAL"}


class LogHandler(logging.Handler):
    """Root-logger handler to the OTel logger provider (the SDK's LoggingHandler is deprecated).

    Our own loggers ("supervisor", "worker") from `own_level`, everything else from WARNING;
    never the telemetry pipeline's own records, so an export error cannot feed itself.
    """

    def __init__(self, provider: LoggerProvider, own_level: int) -> None:
        super().__init__(level=min(own_level, logging.WARNING))
        self.pid = os.getpid()
        self._provider = provider
        self._own_level = own_level

    def _wanted(self, record: logging.LogRecord) -> bool:
        name = record.name
        own = name in OWN_LOGGERS or name.startswith(("supervisor.", "worker."))
        if record.levelno < (self._own_level if own else logging.WARNING):
            return False
        if name.startswith(_QUIET_LOGGERS) or (record.threadName or "").startswith(_EXPORT_THREADS):
            return False
        return os.getpid() == self.pid

    def emit(self, record: logging.LogRecord) -> None:
        if not self._wanted(record):
            return
        try:
            attributes: dict[str, Any] = {
                "code.file.path": record.pathname,
                "code.function.name": record.funcName,
                "code.line.number": record.lineno,
            }
            if record.exc_info and record.exc_info[0] is not None:
                exc_type, exc, _ = record.exc_info
                attributes["exception.type"] = exc_type.__name__
                attributes["exception.message"] = str(exc)
                attributes["exception.stacktrace"] = self.formatter.formatException(record.exc_info) if self.formatter \
                    else logging.Formatter().formatException(record.exc_info)
            self._provider.get_logger(record.name).emit(
                timestamp=int(record.created * 1e9),
                observed_timestamp=time_ns(),
                context=otel_context.get_current(),
                severity_number=_SEVERITY.get(record.levelno, SeverityNumber.UNSPECIFIED),
                severity_text=_SEVERITY_TEXT.get(record.levelname, record.levelname),
                body=record.getMessage(),
                attributes=attributes,
            )
        except Exception:
            self.handleError(record)
