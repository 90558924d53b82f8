"""What every stand-in's HTTP server shares: a server on a daemon thread whose stop also ends
kept-alive connections, and a handler that routes each allowed method to one `dispatch`."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

log = logging.getLogger("supervisor.simulator")

Served = TypeVar("Served", bound="ServedOnThread")


class TrackingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self.closing = threading.Event()  # wakes handlers that hang or sleep on purpose (faults)
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def track(self, conn: socket.socket, open_: bool) -> None:
        with self._connections_lock:
            (self._connections.add if open_ else self._connections.discard)(conn)

    def close(self) -> None:
        self.closing.set()
        self.shutdown()
        self.server_close()
        # Kept-alive connections would otherwise go on being served.
        with self._connections_lock:
            connections, self._connections = list(self._connections), set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out (slow faults) or go away are routine here.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class StandInHandler(BaseHTTPRequestHandler):
    server: TrackingServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes
    methods: tuple[str, ...] = ("GET", "POST", "DELETE")  # the others: 501, as http.server answers them

    def setup(self) -> None:
        super().setup()
        self.server.track(self.connection, True)

    def finish(self) -> None:
        self.server.track(self.connection, False)
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._route("GET")

    def do_PUT(self) -> None:  # noqa: N802
        self._route("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._route("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._route("PATCH")

    def do_DELETE(self) -> None:  # noqa: N802
        self._route("DELETE")

    def _route(self, method: str) -> None:
        if method in self.methods:
            self.dispatch(method)
        else:
            self.send_error(501, f"Unsupported method ({method!r})")

    def dispatch(self, method: str) -> None:
        raise NotImplementedError


class ServedOnThread:
    """start/stop (and `with`) for a stand-in: `make_server` builds its TrackingServer, served on a daemon thread."""

    host: str = "127.0.0.1"
    port: int = 0
    thread_name = "stand-in"
    tls: ssl.SSLContext | None = None  # set: served over HTTPS

    def make_server(self) -> TrackingServer:
        raise NotImplementedError

    def start(self: Served) -> Served:
        server = self.make_server()
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        self._server: TrackingServer | None = server
        self.port = server.server_address[1]
        self._thread: threading.Thread | None = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = getattr(self, "_server", None), getattr(self, "_thread", None)
        self._server = self._thread = None
        if server is not None:
            server.close()
        if thread is not None:
            thread.join(5)

    def __enter__(self: Served) -> Served:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls is not None else 'http'}://{host}:{self.port}"
