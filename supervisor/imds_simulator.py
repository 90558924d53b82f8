"""A local Azure IMDS over real HTTP, for the demo and the tests.

Azure endpoints (400 without `Metadata: true` or without api-version):
  GET  /metadata/instance?api-version=...
  GET  /metadata/scheduledevents?api-version=...
  POST /metadata/scheduledevents?api-version=...   {"StartRequests": [{"EventId": ...}]}

Control endpoints (JSON in and out, no Metadata header needed):
  POST   /simulate/eviction        {"delay_s", "resources", "complete_after_s"}
  POST   /simulate/event           {"type", "delay_s", "resources", "status", "source",
                                    "duration_s", "description", "complete_after_s"}
  DELETE /simulate/event/<EventId>
  POST   /simulate/document        a whole Scheduled Events document, served verbatim
  POST   /simulate/faults          {"mode": "500"|"410"|"429"|"slow"|"garbage"|"reset",
                                    "count", "delay_s", "retry_after_s"}
  POST   /simulate/reset
  GET    /simulate/acks            [{"time", "body", "raw", "headers"}, ...]
  GET    /simulate/requests        {"GET /metadata/scheduledevents": n, ...}

Events created here start by themselves once NotBefore passes (NotBefore
becomes "") and, given complete_after_s, disappear that long after starting.
Events loaded with /simulate/document are served as given: no clock applies
to them, so fixture files keep their meaning whatever today's date.
"""

from __future__ import annotations

import argparse
import email.utils
import json
import logging
import signal
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from supervisor.imds import is_json_int

log = logging.getLogger(__name__)

DEFAULT_PORT = 8169
SCHEDULED_EVENTS_PATH = "/metadata/scheduledevents"
INSTANCE_PATH = "/metadata/instance"
FAULT_MODES = ("500", "410", "429", "slow", "garbage", "reset")
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"

_NO_HEADER = {"error": "Bad request. Required metadata header not specified"}
_NO_API_VERSION = {
    "error": "Bad request. api-version was not specified in the request. For more information refer to aka.ms/azureimds",
    "newest-versions": ["2023-07-01", "2021-02-01", "2020-07-01"],
}


class BadRequest(Exception):
    pass


@dataclass
class _Event:
    event_id: str
    event_type: str
    status: str
    resources: list[str]
    not_before: float | None  # epoch seconds; None once started
    source: str = "Platform"
    duration_s: int = -1
    description: str = ""
    visible_at: float = 0.0
    complete_after_s: float | None = None
    started_at: float | None = None
    raw: dict[str, Any] | None = None  # from /simulate/document: served as is, no clock

    def render(self) -> dict[str, Any]:
        if self.raw is not None:
            return dict(self.raw)
        return {
            "EventId": self.event_id,
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(self.resources),
            "NotBefore": "" if self.not_before is None else email.utils.formatdate(self.not_before, usegmt=True),
            "Description": self.description,
            "EventSource": self.source,
            "DurationInSeconds": self.duration_s,
        }

    def start(self, now: float) -> None:
        self.status = "Started"
        self.not_before = None
        self.started_at = now
        if self.raw is not None:
            self.raw = {**self.raw, "EventStatus": "Started", "NotBefore": ""}


@dataclass
class _Faults:
    mode: str = ""
    count: int = 0
    delay_s: float = 0.0
    retry_after_s: float | None = None


@dataclass
class _State:
    incarnation: int = 1
    events: list[_Event] = field(default_factory=list)
    opaque: Any = None  # a /simulate/document that is not a well-formed document
    snapshot: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    faults: _Faults = field(default_factory=_Faults)
    requests: Counter[str] = field(default_factory=Counter)


class ImdsSimulator:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, vm_name: str = "vm-spot-07",
                 vm_size: str = "Standard_D2s_v3", priority: str = "Spot", eviction_policy: str | None = None,
                 location: str = "eastus2", resource_group: str = "rg-vmspot", vm_scale_set_name: str = "",
                 notice_s: float = 30.0, on_ack: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.host = host
        self.on_ack = on_ack  # called in the request's thread before the ack is answered
        self.port = port
        self.vm_name = vm_name
        self.vm_size = vm_size
        self.priority = priority
        self.eviction_policy = eviction_policy if eviction_policy is not None else (
            "Deallocate" if priority.lower() == "spot" else "")
        self.location = location
        self.resource_group = resource_group
        self.vm_scale_set_name = vm_scale_set_name
        self.notice_s = notice_s
        self.vm_id = str(uuid.uuid4())
        self._lock = threading.Lock()
        self._state = _State()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> ImdsSimulator:
        server = _Server((self.host, self.port), _make_handler(self))
        self._server = server
        self.port = server.server_address[1]
        self._closing.clear()
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="imds-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()  # wakes handlers sleeping in a "slow" fault
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        # Kept-alive connections would otherwise go on being served.
        with self._lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ImdsSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -- state, usable in-process as well as over HTTP ---------------------

    def instance_document(self) -> dict[str, Any]:
        resource_id = (f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{self.resource_group}"
                       f"/providers/Microsoft.Compute/virtualMachines/{self.vm_name}")
        return {
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "evictionPolicy": self.eviction_policy,
                "location": self.location,
                "name": self.vm_name,
                "osType": "Linux",
                "priority": self.priority,
                "provider": "Microsoft.Compute",
                "resourceGroupName": self.resource_group,
                "resourceId": resource_id,
                "subscriptionId": SUBSCRIPTION_ID,
                "tags": "",
                "vmId": self.vm_id,
                "vmScaleSetName": self.vm_scale_set_name,
                "vmSize": self.vm_size,
                "zone": "",
            },
            "network": {"interface": []},
        }

    def events_document(self) -> Any:
        with self._lock:
            self._advance(time.time())
            return self._render()

    def add_event(self, event_type: str, *, delay_s: float | None = None, resources: list[str] | None = None,
                  status: str = "Scheduled", source: str = "Platform", duration_s: int = -1,
                  description: str = "", complete_after_s: float | None = None, after_s: float = 0.0,
                  event_id: str | None = None) -> dict[str, Any]:
        """Schedule an event; it shows up after `after_s`, with NotBefore `delay_s` later."""
        now = time.time()
        visible_at = now + after_s
        delay = self.notice_s if delay_s is None else delay_s
        event = _Event(
            event_id=event_id or str(uuid.uuid4()).upper(),
            event_type=event_type,
            status=status,
            resources=list(resources) if resources is not None else [self.vm_name],
            not_before=None if status == "Started" else visible_at + delay,
            source=source,
            duration_s=duration_s,
            description=description,
            visible_at=visible_at,
            complete_after_s=complete_after_s,
            started_at=visible_at if status == "Started" else None,
        )
        with self._lock:
            self._drop_opaque()
            self._state.events.append(event)
            self._advance(now)
            rendered = event.render()
            return {"EventId": event.event_id, "EventType": event_type, "NotBefore": rendered["NotBefore"],
                    "Resources": event.resources, "VisibleAt": visible_at,
                    "DocumentIncarnation": self._state.incarnation}

    def simulate_eviction(self, delay_s: float | None = None, resources: list[str] | None = None,
                          complete_after_s: float | None = None, after_s: float = 0.0) -> dict[str, Any]:
        return self.add_event("Preempt", delay_s=delay_s, resources=resources,
                              complete_after_s=complete_after_s, after_s=after_s)

    def cancel_event(self, event_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._advance(time.time())
            for event in self._state.events:
                if event.event_id == event_id:
                    self._state.events.remove(event)
                    self._commit()
                    return {"EventId": event_id, "DocumentIncarnation": self._state.incarnation}
        return None

    def set_document(self, document: Any) -> dict[str, Any]:
        """Serve `document` as given; a well-formed one still reacts to acks and cancels."""
        with self._lock:
            state = self._state
            if (isinstance(document, dict) and is_json_int(document.get("DocumentIncarnation"))
                    and isinstance(document.get("Events"), list)
                    and all(isinstance(e, dict) and isinstance(e.get("EventId"), str) for e in document["Events"])):
                state.opaque = None
                state.events = [_Event(e["EventId"], str(e.get("EventType")), str(e.get("EventStatus")), [],
                                       None, raw=dict(e)) for e in document["Events"]]
                state.incarnation = document["DocumentIncarnation"]
                state.snapshot = [e.render() for e in state.events]
            else:
                state.opaque = document
                state.events = []
                state.snapshot = []
            return {"DocumentIncarnation": state.incarnation, "Events": [e.event_id for e in state.events],
                    "verbatim": state.opaque is not None}

    def set_faults(self, mode: str, count: int = 1, delay_s: float | None = None,
                   retry_after_s: float | None = None) -> dict[str, Any]:
        if mode not in FAULT_MODES:
            raise BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
        if not is_json_int(count) or count < 0:
            raise BadRequest(f"count must be a whole number >= 0, got {count!r}")
        delay = (2.0 if mode == "slow" else 0.0) if delay_s is None else float(delay_s)
        with self._lock:
            self._state.faults = _Faults(mode, count, delay, retry_after_s)
        return {"mode": mode, "count": count, "delay_s": delay, "retry_after_s": retry_after_s}

    def acknowledge(self, body: Any, raw: str, headers: dict[str, str]) -> list[str]:
        now = time.time()
        record = {"time": now, "body": body, "raw": raw, "headers": headers}
        if self.on_ack is not None:
            self.on_ack(record)
        with self._lock:
            self._state.acks.append(record)
            self._advance(now)
            requested = {r["EventId"] for r in body["StartRequests"]}
            started = []
            for event in self._state.events:
                if event.event_id in requested and event.status != "Started":
                    event.start(now)
                    started.append(event.event_id)
            self._commit()
            return started

    def acks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._state.acks]

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._state.requests)

    def reset(self) -> dict[str, Any]:
        with self._lock:
            old = self._state
            self._state = _State(incarnation=old.incarnation + (old.opaque is not None), snapshot=old.snapshot)
            self._commit()
            return {"DocumentIncarnation": self._state.incarnation}

    # -- internals (called with the lock held) ---------------------------

    def _advance(self, now: float) -> None:
        """Let the clock act on managed events: start them, complete them."""
        kept = []
        for event in self._state.events:
            if event.raw is None:
                if event.status != "Started" and event.not_before is not None and now >= event.not_before:
                    event.start(event.not_before)
                if (event.complete_after_s is not None and event.started_at is not None
                        and now >= event.started_at + event.complete_after_s):
                    continue
            kept.append(event)
        self._state.events = kept
        self._commit()

    def _visible(self) -> list[_Event]:
        now = time.time()
        return [e for e in self._state.events if e.raw is not None or e.visible_at <= now]

    def _commit(self) -> None:
        """Bump DocumentIncarnation whenever the Events array as served changed."""
        if self._state.opaque is not None:
            return
        rendered = [e.render() for e in self._visible()]
        if rendered != self._state.snapshot:
            self._state.snapshot = rendered
            self._state.incarnation += 1

    def _render(self) -> Any:
        if self._state.opaque is not None:
            return self._state.opaque
        return {"DocumentIncarnation": self._state.incarnation, "Events": list(self._state.snapshot)}

    def _drop_opaque(self) -> None:
        if self._state.opaque is not None:
            self._state.opaque = None
            self._state.snapshot = []
            self._state.incarnation += 1

    def _take_fault(self) -> _Faults | None:
        with self._lock:
            faults = self._state.faults
            if faults.count <= 0:
                return None
            faults.count -= 1
            return _Faults(faults.mode, 1, faults.delay_s, faults.retry_after_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out (slow faults) or go away are routine here.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


def _make_handler(sim: ImdsSimulator) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        simulator = sim

    return Handler


class _Handler(BaseHTTPRequestHandler):
    simulator: ImdsSimulator
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    server_version = "imds-simulator"

    def setup(self) -> None:
        super().setup()
        with self.simulator._lock:
            self.simulator._connections.add(self.connection)

    def finish(self) -> None:
        with self.simulator._lock:
            self.simulator._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path.rstrip("/") or "/"
        query = parse_qs(parts.query)
        body = self._read_body()
        sim = self.simulator
        endpoint = path if not path.startswith("/simulate/event/") else "/simulate/event/<id>"
        with sim._lock:
            sim._state.requests[f"{method} {endpoint}"] += 1
        try:
            if path in (SCHEDULED_EVENTS_PATH, INSTANCE_PATH):
                self._metadata(method, path, query, body)
            elif path.startswith("/simulate/"):
                self._control(method, path, body)
            else:
                self._json(404, {"error": f"not found: {path}"})
        except BadRequest as exc:
            self._json(400, {"error": str(exc)})

    # -- Azure ---------------------------------------------------------------

    def _metadata(self, method: str, path: str, query: dict[str, list[str]], body: bytes) -> None:
        sim = self.simulator
        if self.headers.get("Metadata", "").lower() != "true":
            return self._json(400, _NO_HEADER)
        if not query.get("api-version", [""])[0]:
            return self._json(400, _NO_API_VERSION)
        if path == INSTANCE_PATH:
            if method != "GET":
                return self._json(405, {"error": "method not allowed"})
            return self._json(200, sim.instance_document())
        if method == "GET":
            fault = sim._take_fault()
            if fault is not None and self._fault(fault):
                return None
            return self._json(200, sim.events_document())
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
        started = self.simulator.acknowledge(parsed, raw, dict(self.headers.items()))
        log.info("ack received: %s (started: %s)", raw, ", ".join(started) or "none")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def _fault(self, fault: _Faults) -> bool:
        """Misbehave as told; False means "then answer normally" (slow)."""
        if fault.delay_s > 0 and self.simulator._closing.wait(fault.delay_s):
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
        sim = self.simulator
        route = (method, path)
        if route == ("GET", "/simulate/acks"):
            return self._json(200, sim.acks())
        if route == ("GET", "/simulate/requests"):
            return self._json(200, sim.request_counts())
        if method == "GET" and path in ("/simulate/document", "/simulate/state"):
            return self._json(200, sim.events_document())
        data = self._json_body(body)
        result: dict[str, Any] | None
        if path != "/simulate/document" and not isinstance(data, dict):
            raise BadRequest("body must be a JSON object")
        if route == ("POST", "/simulate/eviction"):
            result = sim.simulate_eviction(delay_s=_number(data, "delay_s"), resources=_resources(data),
                                           complete_after_s=_number(data, "complete_after_s"),
                                           after_s=_number(data, "after_s") or 0.0)
        elif route == ("POST", "/simulate/event"):
            event_type = data.get("type")
            if not isinstance(event_type, str) or not event_type:
                raise BadRequest("type is required, e.g. Preempt, Freeze, Reboot, Redeploy, Terminate")
            result = sim.add_event(
                event_type, delay_s=_number(data, "delay_s"), resources=_resources(data),
                status=_text(data, "status", "Scheduled"), source=_text(data, "source", "Platform"),
                duration_s=_whole(data, "duration_s", -1), description=_text(data, "description", ""),
                complete_after_s=_number(data, "complete_after_s"), after_s=_number(data, "after_s") or 0.0)
        elif method == "DELETE" and path.startswith("/simulate/event/"):
            event_id = path.removeprefix("/simulate/event/")
            result = sim.cancel_event(event_id)
            if result is None:
                return self._json(404, {"error": f"no such event: {event_id}"})
        elif route == ("POST", "/simulate/document"):
            result = sim.set_document(data)
        elif route == ("POST", "/simulate/faults"):
            result = sim.set_faults(str(data.get("mode", "")), _whole(data, "count", 1), _number(data, "delay_s"),
                                    _number(data, "retry_after_s"))
        elif route == ("POST", "/simulate/reset"):
            result = sim.reset()
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
        data = json.dumps(payload).encode()
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


# -- CLI (wired by supervisor.cli as `spot-supervisor simulate`) ---------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on (default: %(default)s)")
    parser.add_argument("--vm-name", default="vm-spot-07", help="compute.name served (default: %(default)s)")
    parser.add_argument("--vm-size", default="Standard_D2s_v3", help="compute.vmSize served (default: %(default)s)")
    parser.add_argument("--priority", default="Spot", choices=("Spot", "Regular", "Low"),
                        help="compute.priority served (default: %(default)s)")
    parser.add_argument("--evict-after", type=float, default=None, metavar="S",
                        help="post a Preempt for this VM S seconds after start")
    parser.add_argument("--notice", type=float, default=30.0, metavar="S",
                        help="seconds between an eviction appearing and its NotBefore (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    sim = ImdsSimulator(args.host, args.port, vm_name=args.vm_name, vm_size=args.vm_size,
                        priority=args.priority, notice_s=args.notice)
    try:
        sim.start()
    except OSError as exc:
        print(f"imds simulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", flush=True)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"imds simulator listening on {sim.url} (vm {sim.vm_name}, {sim.vm_size}, {sim.priority})", flush=True)
        print(f"  point the supervisor at it: SPOT_EVENTS_ENDPOINT={sim.url}", flush=True)
        if args.evict_after is not None:
            result = sim.simulate_eviction(delay_s=args.notice, after_s=args.evict_after)
            log.info("eviction %s scheduled: appears in %gs, NotBefore %s", result["EventId"],
                     args.evict_after, result["NotBefore"])
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    print("imds simulator stopped", flush=True)
    return 0
