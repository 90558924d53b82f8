"""The simulator served over real HTTP: Azure's IMDS paths plus /simulate/* control endpoints."""

from __future__ import annotations

import json
import logging
import socket
import struct
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from supervisor.simulator.http_base import ServedOnThread, StandInHandler, TrackingServer
from supervisor.simulator.identity import TOKEN_PATH, IdentityEndpoint
from supervisor.simulator.state import BadRequest, Fault, ImdsState
from supervisor.vm.imds import is_json_int

log = logging.getLogger("supervisor.simulator")

SCHEDULED_EVENTS_PATH = "/metadata/scheduledevents"
INSTANCE_PATH = "/metadata/instance"

_NO_HEADER = {"error": "Bad request. Required metadata header not specified"}
_NO_API_VERSION = {
    "error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
    "newest-versions": ["2023-07-01", "2021-02-01", "2020-07-01"],
}


class ImdsSimulator(ImdsState, ServedOnThread):
    """The model (ImdsState) plus an HTTP server on a daemon thread: `with ImdsSimulator() as sim: sim.url`."""

    thread_name = "imds-simulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, vm_name: str = "vm-spot-07",
                 vm_size: str = "Standard_D2s_v3", priority: str = "Spot", eviction_policy: str | None = None,
                 location: str = "eastus2", resource_group: str = "rg-vmspot", vm_scale_set_name: str = "",
                 notice_s: float = 30.0, on_ack: Callable[[dict[str, Any]], None] | None = None) -> None:
        super().__init__(vm_name=vm_name, vm_size=vm_size, priority=priority, eviction_policy=eviction_policy,
                         location=location, resource_group=resource_group, vm_scale_set_name=vm_scale_set_name,
                         notice_s=notice_s, on_ack=on_ack)
        self.host = host
        self.port = port
        self.identity = IdentityEndpoint()  # the managed-identity token endpoint (the fleet keeper's tests)

    def make_server(self) -> TrackingServer:
        server = _Server((self.host, self.port), _Handler)
        server.state = self
        return server


class _Server(TrackingServer):
    state: ImdsState


class _Handler(StandInHandler):
    server: _Server
    server_version = "imds-simulator"

    def dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query)
        body = self._read_body()
        endpoint = path if not path.startswith("/simulate/event/") else "/simulate/event/<id>"
        self.server.state.count_request(f"{method} {endpoint}")
        try:
            if path == TOKEN_PATH and isinstance(self.server.state, ImdsSimulator):
                self._json(*self.server.state.identity.answer(query, self.headers.get("Metadata")))
            elif path in (SCHEDULED_EVENTS_PATH, INSTANCE_PATH):
                self._metadata(method, path, query, body)
            elif path.startswith("/simulate/"):
                self._control(method, path, body)
            else:
                self._json(404, {"error": f"not found: {path}"})
        except BadRequest as exc:
            self._json(400, {"error": str(exc)})

    # -- Azure ---------------------------------------------------------------

    def _metadata(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        state = self.server.state
        if self.headers.get("Metadata", "").lower() != "true":
            return self._json(400, _NO_HEADER)
        if not query.get("api-version", [""])[0]:
            return self._json(400, _NO_API_VERSION)
        if path == INSTANCE_PATH:
            if method != "GET":
                return self._json(405, {"error": "method not allowed"})
            return self._json(200, state.instance_document())
        if method == "GET":
            fault = state.take_fault()
            if fault is not None and self._fault(fault):
                return None
            return self._send(200, state.events_document_text())
        if method == "POST":
            return self._ack(body)
        return self._json(405, {"error": "method not allowed"})

    def _ack(self, body: bytes) -> None:
        raw = body.decode("utf-8", "replace")
        try:
            parsed = json.loads(raw)
        except ValueError:
            return self._json(400, {"error": "Bad request. The request body is not valid JSON"})
        requests = parsed.get("StartRequests") if isinstance(parsed, dict) else None
        if not isinstance(requests, list) or not all(
                isinstance(r, dict) and isinstance(r.get("EventId"), str) for r in requests):
            return self._json(400, {"error": "Bad request. Expected {\"StartRequests\": [{\"EventId\": ...}]}"})
        started = self.server.state.acknowledge(parsed, raw, dict(self.headers.items()))
        log.info("ack received: %s (started: %s)", raw, ", ".join(started) or "none")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def _fault(self, fault: Fault) -> bool:
        """Misbehave as told; False means "then answer normally" (slow)."""
        if fault.delay_s > 0 and self.server.closing.wait(fault.delay_s):
            return True
        log.info("fault injected: %s", fault.mode)
        if fault.mode == "slow":
            return False
        if fault.mode == "reset":
            # SO_LINGER 0: close() sends RST instead of a clean FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return True
        if fault.mode == "garbage":
            payload = b'{"DocumentIncarnation": 3, "Events": [{"EventId": '
            self.send_response(200)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return True
        status = int(fault.mode)
        messages = {500: "Internal server error", 410: "Gone", 429: "Too many requests"}
        headers = {}
        if fault.retry_after_s is not None:
            headers["Retry-After"] = f"{fault.retry_after_s:g}"
        self._json(status, {"error": messages[status]}, headers)
        return True

    # -- control -------------------------------------------------------------

    def _control(self, method: str, path: str, body: bytes) -> None:
        state = self.server.state
        route = (method, path)
        if route == ("GET", "/simulate/acks"):
            return self._json(200, state.acks())
        if route == ("GET", "/simulate/requests"):
            return self._json(200, state.request_counts())
        if method == "GET" and path in ("/simulate/document", "/simulate/state"):
            return self._json(200, state.events_document())
        if route == ("POST", "/simulate/verbatim-event"):
            return self._json(200, state.add_verbatim_event(body.decode("utf-8", "surrogateescape")))
        data = self._json_body(body)
        result: dict[str, Any] | None
        if path != "/simulate/document" and not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        if route == ("POST", "/simulate/eviction"):
            result = state.simulate_eviction(delay_s=_number(data, "delay_s"), resources=_resources(data),
                                             complete_after_s=_number(data, "complete_after_s"),
                                             after_s=_number(data, "after_s") or 0.0)
        elif route == ("POST", "/simulate/event"):
            event_type = data.get("type")
            if not isinstance(event_type, str) or not event_type:
                raise BadRequest("type is required, e.g. Preempt, Freeze, Reboot, Redeploy, Terminate")
            result = state.add_event(
                event_type, delay_s=_number(data, "delay_s"), resources=_resources(data),
                status=_text(data, "status", "Scheduled"), source=_text(data, "source", "Platform"),
                duration_s=_whole(data, "duration_s", -1), description=_text(data, "description", ""),
                complete_after_s=_number(data, "complete_after_s"), after_s=_number(data, "after_s") or 0.0)
        elif method == "DELETE" and path.startswith("/simulate/event/"):
            event_id = path.removeprefix("/simulate/event/")
            result = state.cancel_event(event_id)
            if result is None:
                return self._json(404, {"error": f"no such event: {event_id}"})
        elif route == ("POST", "/simulate/document"):
            result = state.set_document(data)
        elif route == ("POST", "/simulate/faults"):
            result = state.set_faults(str(data.get("mode", "")), _whole(data, "count", 1), _number(data, "delay_s"),
                                      _number(data, "retry_after_s"))
        elif route == ("POST", "/simulate/reset"):
            result = state.reset()
        else:
            return self._json(404, {"error": f"no control endpoint {method} {path}"})
        log.info("control %s %s -> %s", method, path, json.dumps(result))
        return self._json(200, result)

    # -- plumbing ------------------------------------------------------------

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    @staticmethod
    def _json_body(body: bytes) -> Any:
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except ValueError as exc:
            raise BadRequest(f"body is not valid JSON: {exc}") from None

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _send(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _number(data: Any, key: str) -> float | None:
    value = data.get(key) if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number, got {value!r}")
    return float(value)


def _whole(data: Any, key: str, default: int) -> int:
    value = data.get(key, default) if isinstance(data, dict) else default
    if not is_json_int(value):
        raise BadRequest(f"{key} must be a whole number, got {value!r}")
    return int(value)


def _text(data: Any, key: str, default: str) -> str:
    value = data.get(key, default) if isinstance(data, dict) else default
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string, got {value!r}")
    return value


def _resources(data: Any) -> list[str] | None:
    value = data.get("resources") if isinstance(data, dict) else None
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
        raise BadRequest(f"resources must be a list of VM names, got {value!r}")
    return value
