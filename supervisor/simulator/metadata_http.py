"""A small HTTP server for the AWS and GCP metadata models (the Azure one keeps server.py).

A model answers `serve(method, path, query, headers)` with a `Reply` for metadata paths and
`control(method, path, data)` with a JSON-able result for /simulate/* paths.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from supervisor.simulator.http_base import ServedOnThread, StandInHandler, TrackingServer
from supervisor.simulator.state import BadRequest

log = logging.getLogger("supervisor.simulator")


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hang: bool = False  # never answer (until the server stops)
    reset: bool = False  # close the connection with a TCP RST

    @staticmethod
    def text(status: int, text: str, **headers: str) -> Reply:
        return Reply(status, text.encode(), {"Content-Type": "text/plain", **headers})

    @staticmethod
    def json(status: int, payload: Any) -> Reply:
        return Reply(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})


class MetadataModel(Protocol):
    cloud: str

    def serve(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Reply: ...

    def control(self, method: str, path: str, data: dict[str, Any]) -> Any: ...

    def close(self) -> None: ...


class MetadataServer(ServedOnThread):
    """`model` served over HTTP on a daemon thread: `with MetadataServer(AwsMetadata()) as sim: sim.url`."""

    def __init__(self, model: MetadataModel, host: str = "127.0.0.1", port: int = 0) -> None:
        self.model = model
        self.host = host
        self.port = port
        self.thread_name = f"{model.cloud}-metadata-simulator"
        self.requests: Counter[str] = Counter()
        self._lock = threading.Lock()

    def make_server(self) -> TrackingServer:
        server = _Server((self.host, self.port), _Handler)
        server.owner = self
        return server

    def stop(self) -> None:
        self.model.close()
        super().stop()

    def count(self, key: str) -> None:
        with self._lock:
            self.requests[key] += 1

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self.requests)


class _Server(TrackingServer):
    owner: MetadataServer


class _Handler(StandInHandler):
    server: _Server
    server_version = "metadata-simulator"
    methods = ("GET", "PUT", "POST", "DELETE")

    def dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        path = parts.path
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        owner = self.server.owner
        owner.count(f"{method} {path}")
        try:
            if path.startswith("/simulate/"):
                data = json.loads(body) if body.strip() else {}
                if not isinstance(data, dict):
                    raise BadRequest("body must be a JSON object")
                if (method, path) == ("GET", "/simulate/requests"):
                    result = owner.request_counts()
                else:
                    result = owner.model.control(method, path, data)
                log.info("control %s %s -> %s", method, path, json.dumps(result))
                return self._reply(Reply.json(200, result))
            headers = {k.lower(): v for k, v in self.headers.items()}
            return self._reply(owner.model.serve(method, path, query, headers))
        except (BadRequest, ValueError) as exc:
            return self._reply(Reply.json(400, {"error": str(exc)}))
        except KeyError as exc:
            return self._reply(Reply.json(404, {"error": f"not found: {exc}"}))

    def _reply(self, reply: Reply) -> None:
        if reply.hang:
            self.server.closing.wait()
            self.close_connection = True
            return
        if reply.reset:
            # SO_LINGER 0: close() sends RST instead of a clean FIN.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)
