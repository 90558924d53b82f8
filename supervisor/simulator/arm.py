"""An Azure Resource Manager stand-in over HTTPS: the scale-set operations the fleet keeper uses.

    GET    {S}?api-version=...                            the scale set (sku.capacity, tags, eviction policy)
    PATCH  {S}?api-version=...  {"sku": {"capacity": n}}  long-running (Azure-AsyncOperation)
    GET    {S}/virtualMachines?$expand=instanceView&...   paged {value, nextLink}
    POST   {S}/delete  {"instanceIds": [...]}             long-running; lowers the capacity
    POST   {S}/start   {"instanceIds": [...]}             long-running; starts deallocated instances
    GET    /subscriptions/{sub}/providers/Microsoft.Compute/locations/{loc}/operations/{id}

where S = /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}.
ARM calls need `Authorization: Bearer ...` (401 otherwise) and api-version (400 otherwise).

Control API (JSON, no token; `scale_set` is a name or a resource ID):
    POST /control/scale-sets  {"name", "eviction_policy", "capacity", "available", "refusal_code", "tags"}
    POST /control/allocation  {"scale_set", "available" (null: no limit), "refusal_code"}
    POST /control/faults      {"scale_set", "mode": 403|404|429|500|503|stall|garbage|deep, "count", "retry_after_s", "methods"}
    POST /control/evict       {"scale_set", "instance_id"}
    POST /control/fail        {"scale_set", "instance_id", "health": false}
    POST /control/tags        {"scale_set", "tags": {...}}
    GET  /control/state       every scale set and instance
"""

from __future__ import annotations

import json
import logging
import re
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from supervisor.simulator.arm_state import ArmState, Fault, StandInError
from supervisor.simulator.http_base import ServedOnThread, StandInHandler, TrackingServer

log = logging.getLogger("supervisor.simulator.arm")

PAGE_SIZE = 50
_SCALE_SET = re.compile(r"^(/subscriptions/[^/]+/resourcegroups/[^/]+/providers/microsoft\.compute/virtualmachinescalesets/[^/]+)"
                        r"(/virtualmachines|/delete|/start)?$", re.IGNORECASE)
_OPERATION = re.compile(r"^/subscriptions/[^/]+/providers/microsoft\.compute/locations/[^/]+/operations/([^/]+)$", re.IGNORECASE)


class ArmStandIn(ArmState, ServedOnThread):
    """`with ArmStandIn(cert, key) as arm: arm.url`: the model served over HTTPS on a daemon thread."""

    thread_name = "arm-standin"

    def __init__(self, cert_file: Path, key_file: Path, host: str = "127.0.0.1", port: int = 0,
                 create_delay_s: float = 0.0, page_size: int = PAGE_SIZE) -> None:
        super().__init__(create_delay_s)
        self.host, self.port, self.page_size = host, port, page_size
        self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.tls.load_cert_chain(str(cert_file), str(key_file))

    def make_server(self) -> TrackingServer:
        server = _Server((self.host, self.port), _Handler)
        server.standin = self
        return server

    def resolve(self, name_or_id: Any) -> str:
        if not isinstance(name_or_id, str) or not name_or_id:
            raise StandInError(400, "InvalidRequest", "scale_set (a name or a resource ID) is required")
        if name_or_id.startswith("/"):
            return name_or_id
        with self.lock:
            for scale_set in self.scale_sets.values():
                if scale_set.name == name_or_id:
                    return scale_set.id
        raise StandInError(404, "ResourceNotFound", f"no scale set named {name_or_id!r}")


class _Server(TrackingServer):
    standin: ArmStandIn


class _Handler(StandInHandler):
    server: _Server
    server_version = "arm-standin"
    methods = ("GET", "POST", "PATCH")

    @property
    def standin(self) -> ArmStandIn:
        return self.server.standin

    def dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            if parts.path.startswith("/control/"):
                return self._control(method, parts.path, body)
            with self.standin.lock:
                self.standin.requests.append((method, parts.path))
            if not self.headers.get("Authorization", "").startswith("Bearer "):
                raise StandInError(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
            if not query.get("api-version"):
                raise StandInError(400, "MissingApiVersionParameter", "The api-version query parameter (?api-version=) is required.")
            operation = _OPERATION.match(parts.path)
            if operation and method == "GET":
                return self._json(200, self.standin.operation(operation.group(1)))
            match = _SCALE_SET.match(parts.path)
            if not match:
                raise StandInError(404, "InvalidResourceType", f"not served here: {parts.path}")
            scale_set_id, tail = match.group(1), (match.group(2) or "").lower()
            self.standin.find(scale_set_id)
            fault = self.standin.take_fault(scale_set_id, method)
            if fault is not None and self._fault(fault):
                return None
            self._scale_set_call(method, scale_set_id, tail, query, body)
        except StandInError as exc:
            self._json(exc.status, {"error": {"code": exc.code, "message": exc.message}})
        except (ValueError, KeyError, TypeError) as exc:
            self._json(400, {"error": {"code": "InvalidRequestContent", "message": str(exc)}})
        return None

    def _scale_set_call(self, method: str, scale_set_id: str, tail: str, query: dict[str, str], body: bytes) -> None:
        arm = self.standin
        if (method, tail) == ("GET", ""):
            return self._json(200, arm.scale_set_document(scale_set_id))
        if (method, tail) == ("PATCH", ""):
            capacity = json.loads(body or b"{}").get("sku", {}).get("capacity")
            if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
                raise StandInError(400, "InvalidParameter", f"sku.capacity must be a whole number >= 0, got {capacity!r}")
            operation = arm.update_capacity(scale_set_id, capacity)
            log.info("PATCH %s capacity %d: %s", scale_set_id.rsplit("/", 1)[-1], capacity, operation["status"])
            return self._json(200, arm.scale_set_document(scale_set_id), self._lro_headers(operation, location=False))
        if (method, tail) == ("GET", "/virtualmachines"):
            return self._list(scale_set_id, query)
        if method == "POST" and tail in ("/delete", "/start"):
            ids = json.loads(body or b"{}").get("instanceIds")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise StandInError(400, "InvalidParameter", f"instanceIds must be a list of strings, got {ids!r}")
            action = arm.delete_instances if tail == "/delete" else arm.start_instances
            operation = action(scale_set_id, ids)
            log.info("POST %s%s %s: %s", scale_set_id.rsplit("/", 1)[-1], tail, ids, operation["status"])
            return self._json(202, None, self._lro_headers(operation, location=True))
        raise StandInError(405, "MethodNotAllowed", f"{method} {tail or 'scale set'} is not supported here")

    def _list(self, scale_set_id: str, query: dict[str, str]) -> None:
        documents = self.standin.instance_documents(scale_set_id)
        start = int(query.get("$skiptoken", "0") or 0)
        page = documents[start:start + self.standin.page_size]
        result: dict[str, Any] = {"value": page}
        if start + self.standin.page_size < len(documents):
            api_version = query.get("api-version", "")
            result["nextLink"] = (f"{self.standin.url}{scale_set_id}/virtualMachines?$expand=instanceView"
                                  f"&api-version={api_version}&$skiptoken={start + self.standin.page_size}")
        self._json(200, result)

    def _lro_headers(self, operation: dict[str, Any], location: bool) -> dict[str, str]:
        url = (f"{self.standin.url}/subscriptions/{_subscription(self.path)}/providers/Microsoft.Compute/locations/eastus2"
               f"/operations/{operation['name']}?api-version=2024-07-01")
        headers = {"Azure-AsyncOperation": url}
        if location:
            headers["Location"] = url
        return headers

    def _fault(self, fault: Fault) -> bool:
        log.info("fault injected: %s", fault.mode)
        if fault.mode == "stall":
            self.server.closing.wait(3600)
            self.close_connection = True
            return True
        if fault.mode == "garbage":
            self._raw(200, b'{"sku": {"capacity": 3}, "properties": {"virtualMachineProfile": ')
            return True
        if fault.mode == "deep":
            self._raw(200, b"[" * 100_000 + b"]" * 100_000)
            return True
        status = int(fault.mode)
        codes = {403: "AuthorizationFailed", 404: "ResourceNotFound", 429: "TooManyRequests", 500: "InternalServerError",
                 503: "ServiceUnavailable"}
        headers = {} if fault.retry_after_s is None else {"Retry-After": f"{fault.retry_after_s:g}"}
        message = ("The client does not have authorization to perform action 'Microsoft.Compute/virtualMachineScaleSets/read'"
                   if status == 403 else f"fault injected: {status}")
        self._json(status, {"error": {"code": codes[status], "message": message}}, headers)
        return True

    def _control(self, method: str, path: str, body: bytes) -> None:
        arm = self.standin
        if (method, path) == ("GET", "/control/state"):
            return self._json(200, arm.snapshot())
        data = json.loads(body or b"{}")
        if method != "POST" or not isinstance(data, dict):
            raise StandInError(400, "InvalidRequest", "control calls are POST with a JSON object")
        result: Any = {}
        if path == "/control/scale-sets":
            result = {"id": arm.add_scale_set(str(data["name"]), eviction_policy=data.get("eviction_policy", "Delete"),
                                              capacity=int(data.get("capacity", 0)), available=data.get("available"),
                                              refusal_code=data.get("refusal_code", "AllocationFailed"),
                                              tags=data.get("tags"))}
        elif path == "/control/allocation":
            arm.set_allocation(arm.resolve(data.get("scale_set")), data.get("available"), data.get("refusal_code"))
        elif path == "/control/faults":
            arm.add_fault(arm.resolve(data.get("scale_set")), str(data.get("mode")), int(data.get("count", 1)),
                          data.get("retry_after_s"), tuple(data.get("methods") or ()))
        elif path == "/control/evict":
            result = arm.evict(arm.resolve(data.get("scale_set")), str(data.get("instance_id")))
        elif path == "/control/fail":
            arm.fail_instance(arm.resolve(data.get("scale_set")), str(data.get("instance_id")), bool(data.get("health")))
        elif path == "/control/tags":
            arm.set_tags(arm.resolve(data.get("scale_set")), dict(data.get("tags") or {}))
        else:
            raise StandInError(404, "NotFound", f"no control endpoint {method} {path}")
        log.info("control %s %s", path, json.dumps(data)[:200])
        return self._json(200, result)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._raw(status, b"" if payload is None else json.dumps(payload).encode(), headers)

    def _raw(self, status: int, data: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-ms-request-id", "standin")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def _subscription(path: str) -> str:
    parts = urlsplit(path).path.split("/")
    return parts[2] if len(parts) > 2 else "0"
