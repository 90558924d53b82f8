"""worker.telemetry.providers against a real local HTTP ingestion endpoint (the exporter's real HTTP calls)."""

from __future__ import annotations

import gzip
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from supervisor.pool.metrics import SupervisorMetrics
from worker.settings import ConfigError, TelemetrySettings
from worker.telemetry.providers import Telemetry, setup_telemetry

IKEY = "00000000-0000-0000-0000-000000000000"


class Ingestion:
    """Records every POST; answers like Application Insights' /v2.1/track."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        ingestion = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                body = raw.decode("utf-8", "replace")
                with ingestion._lock:
                    ingestion.requests.append((self.path, body))
                try:
                    count = len(json.loads(body))
                except ValueError:
                    count = 0
                reply = json.dumps({"itemsReceived": count, "itemsAccepted": count, "errors": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - keep pytest output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def connection_string(self) -> str:
        return f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{self.port}/"

    def bodies(self) -> str:
        with self._lock:
            return "\n".join(body for _, body in self.requests)

    def envelopes(self) -> list[dict]:
        with self._lock:
            bodies = [body for _, body in self.requests]
        return [envelope for body in bodies for envelope in json.loads(body)]

    def role_instances(self) -> set[str]:
        return {e["tags"].get("ai.cloud.roleInstance", "") for e in self.envelopes()}

    def metric_names(self) -> set[str]:
        return {m["name"] for e in self.envelopes() if e["data"]["baseType"] == "MetricData"
                for m in e["data"]["baseData"]["metrics"]}

    def of_type(self, base_type: str) -> list[dict]:
        return [e["data"]["baseData"] for e in self.envelopes() if e["data"]["baseType"] == base_type]

    def paths(self) -> set[str]:
        with self._lock:
            return {path for path, _ in self.requests}


@pytest.fixture
def ingestion(monkeypatch: pytest.MonkeyPatch) -> Iterator[Ingestion]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("APPLICATIONINSIGHTS_CONNECTION_STRING", raising=False)
    server = Ingestion()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


def exercise(telemetry: Telemetry) -> None:
    with telemetry.message_span("msg-1", 2, "spot-work") as span:
        span.set_attribute("spot.test", "yes")
    with pytest.raises(RuntimeError), telemetry.message_span("msg-2", 1, "spot-work"):
        raise RuntimeError("handler blew up")
    telemetry.record_message("succeeded", 0.25)
    telemetry.record_message("failed", 1.5)
    telemetry.inflight(1)
    telemetry.inflight(-1)
    metrics = SupervisorMetrics(telemetry.meter)
    metrics.record_drain(3.0, "Preempt")
    metrics.record_eviction_notice("Preempt")
    metrics.record_worker_respawn()


def test_exports_spans_metrics_and_logs(ingestion: Ingestion) -> None:
    settings = TelemetrySettings(connection_string=ingestion.connection_string, service_name="spot-test")
    telemetry = setup_telemetry(settings, "worker", {"spot.worker.index": "7"})
    own, library = logging.getLogger("worker.test"), logging.getLogger("some.library")
    own.setLevel(logging.DEBUG)
    library.setLevel(logging.DEBUG)
    try:
        exercise(telemetry)
        own.warning("telemetry test warning %d", 42)
        own.info("own info goes out")
        own.debug("own debug stays local")
        library.info("library chatter stays local")
        library.error("library error goes out")
    finally:
        own.setLevel(logging.NOTSET)
        library.setLevel(logging.NOTSET)
        started = time.monotonic()
        telemetry.shutdown()
        assert time.monotonic() - started < 6
    telemetry.shutdown()  # idempotent

    assert ingestion.paths() == {"/v2.1/track"}
    requests = {r["properties"]["spot.message.id"]: r for r in ingestion.of_type("RequestData")}
    assert requests["msg-1"]["name"] == "process message" and requests["msg-1"]["success"] is True
    assert requests["msg-1"]["properties"]["spot.message.dequeue_count"] == "2"
    assert requests["msg-2"]["success"] is False
    exceptions = ingestion.of_type("ExceptionData")  # the span's recorded exception
    assert any(x["exceptions"][0]["message"] == "handler blew up" for x in exceptions)
    assert {"spot.messages.processed", "spot.handler.duration", "spot.drain.duration", "spot.eviction.notices",
            "spot.worker.respawns"} <= ingestion.metric_names()
    messages = [m["message"] for m in ingestion.of_type("MessageData")]
    assert {"telemetry test warning 42", "own info goes out", "library error goes out"} <= set(messages)
    assert not [m for m in messages if "stays local" in m]
    assert ingestion.role_instances() == {f"{socket.gethostname()}:{os.getpid()}"}  # service.instance.id
    assert {e["tags"]["ai.cloud.role"] for e in ingestion.envelopes()} == {"spot-test"}
    resource = next(m["properties"] for m in ingestion.of_type("MetricData") if m["metrics"][0]["name"] == "_OTELRESOURCE_")
    assert resource["spot.worker.index"] == "7" and resource["spot.role"] == "worker"
    assert not [h for h in logging.getLogger().handlers if type(h).__name__ == "LogHandler"]


def test_without_connection_string_is_silent(ingestion: Ingestion, capfd: pytest.CaptureFixture[str]) -> None:
    threads_before = set(threading.enumerate())
    handlers_before = list(logging.getLogger().handlers)
    telemetry = setup_telemetry(TelemetrySettings(), "supervisor")
    exercise(telemetry)
    logging.getLogger("supervisor.test").warning("only for stderr handlers, if any")
    assert set(threading.enumerate()) == threads_before  # no exporter threads
    assert logging.getLogger().handlers == handlers_before
    telemetry.shutdown()
    telemetry.shutdown()
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert ingestion.requests == []


def test_bad_connection_string_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="telemetry.connection_string"):
        setup_telemetry(TelemetrySettings(connection_string="InstrumentationKey=not-a-guid"), "worker")


def test_shutdown_is_bounded_when_ingestion_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    settings = TelemetrySettings(connection_string=f"InstrumentationKey={IKEY};IngestionEndpoint=http://127.0.0.1:{port}/")
    telemetry = setup_telemetry(settings, "worker")
    exercise(telemetry)
    started = time.monotonic()
    telemetry.shutdown(timeout_s=1.0)
    assert time.monotonic() - started < 2.0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_set_up_after_fork_exports_from_the_child(ingestion: Ingestion) -> None:
    settings = TelemetrySettings(connection_string=ingestion.connection_string, service_name="spot-test")
    parent = setup_telemetry(settings, "supervisor")
    SupervisorMetrics(parent.meter).record_worker_respawn("parent-only")  # sits in the parent's metric reader until its shutdown
    parent_instance = f"{socket.gethostname()}:{os.getpid()}"

    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            # What the child inherited must stay inert, even when poked directly.
            assert parent.meter_provider is not None
            parent.shutdown()
            parent.meter_provider.shutdown()
            child = setup_telemetry(settings, "worker", {"spot.worker.index": "1"})
            with child.message_span("child-msg", 1, "spot-work"):
                pass
            child.record_message("released", 0.5)
            child.shutdown()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)

    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ingestion.role_instances() == {f"{socket.gethostname()}:{pid}"}  # none of the parent's telemetry
    assert "process message" in [r["name"] for r in ingestion.of_type("RequestData")]
    assert "spot.messages.processed" in ingestion.metric_names()

    parent.shutdown()
    assert parent_instance in ingestion.role_instances()
    assert "spot.worker.respawns" in ingestion.metric_names()


def test_gpu_of_a_worker_is_on_its_spans_and_metric_points(ingestion: Ingestion) -> None:
    from supervisor.vm.gpus import Gpu, gpu_attributes

    gpu = gpu_attributes(Gpu(2, "GPU-5b1c2d3e-aaaa-bbbb-cccc-000000000002", "NVIDIA H100 NVL", 95830))
    settings = TelemetrySettings(connection_string=ingestion.connection_string, service_name="spot-test")
    telemetry = setup_telemetry(settings, "worker", {"spot.worker.index": "2", **gpu}, point_attributes=gpu)
    try:
        exercise(telemetry)
    finally:
        telemetry.shutdown()
    requests = ingestion.of_type("RequestData")
    assert requests and all(r["properties"]["spot.gpu.uuid"] == gpu["spot.gpu.uuid"] for r in requests)
    points = [m for m in ingestion.of_type("MetricData") if m["metrics"][0]["name"] == "spot.messages.processed"]
    assert points and all(p["properties"]["spot.gpu.index"] == "2" and "outcome" in p["properties"] for p in points)
    resource = next(m["properties"] for m in ingestion.of_type("MetricData") if m["metrics"][0]["name"] == "_OTELRESOURCE_")
    assert resource["spot.gpu.name"] == "NVIDIA H100 NVL"
