"""A TCP proxy on 127.0.0.1 that puts network latency and faults between a
client (the workers, the bench) and a local server (Azurite).

Each connection is pumped by two threads. A "request" is the first data the
client sends after the previous response began; a fault, when one is drawn,
hits that request. The delay is added once per response, before its first byte
reaches the client, which is how a longer round trip looks to an HTTP client
(the kernel here has no netem).

Faults (`mode`, applied to a share `fault_rate` of requests, 1.0 = all):
  pass      forward untouched
  reset     the client's connection is reset (RST), nothing forwarded
  stall     nothing forwarded; the connection is held `stall_s`, then closed
  garbage   the client gets bytes that are not HTTP, then the connection closes
  http503   the client gets `HTTP/1.1 503 Server Busy`, nothing forwarded
  lost      forwarded (the server acts on it), but the response never comes: the client's
            connection stays silent `stall_s`, then closes (a lost response, a hung call)

`methods` narrows the faults to requests with those HTTP methods (e.g. ("DELETE",)); the
others pass untouched and are not counted as drawn.
"""

from __future__ import annotations

import random
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from types import TracebackType

MODES = ("pass", "reset", "stall", "garbage", "http503", "lost")
_GARBAGE = b"\x00\xff garbage \x13\x37 not http at all \xfe\r\n\r\n"
_BUSY = (b"HTTP/1.1 503 Server Busy\r\nContent-Type: application/xml\r\nContent-Length: 0\r\n"
         b"x-ms-error-code: ServerBusy\r\nConnection: close\r\n\r\n")


@dataclass
class ProxyStats:
    connections: int = 0
    requests: int = 0
    faults: Counter[str] = field(default_factory=Counter)


class FaultProxy:
    def __init__(self, target_port: int, *, delay_s: float = 0.0, mode: str = "pass", fault_rate: float = 1.0,
                 stall_s: float = 30.0, seed: int | None = None, target_host: str = "127.0.0.1",
                 methods: tuple[str, ...] | None = None) -> None:
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self.stall_s = stall_s
        self.stats = ProxyStats()
        self._mode = "pass"
        self._fault_rate = 1.0
        self._methods: tuple[bytes, ...] | None = None
        self.set_fault(mode, fault_rate, methods)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._acceptor.start()
        return self

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def set_fault(self, mode: str, fault_rate: float = 1.0, methods: tuple[str, ...] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= fault_rate <= 1.0:
            raise ValueError(f"fault_rate must be within [0, 1], got {fault_rate}")
        self._mode, self._fault_rate = mode, fault_rate
        self._methods = tuple(m.upper().encode() + b" " for m in methods) if methods else None

    def stop(self) -> None:
        """Close the listener and every open connection (the clients see them end)."""
        self._closing.set()
        self._listener.close()
        with self._lock:
            open_sockets = list(self._sockets)
        for sock in open_sockets:
            _close(sock)

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), name="fault-proxy-conn", daemon=True).start()

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def _draw_fault(self, first_bytes: bytes) -> str:
        with self._lock:
            self.stats.requests += 1
            mode = self._mode
            if self._methods is not None and not first_bytes.startswith(self._methods):
                return "pass"
            if mode != "pass" and self._rng.random() < self._fault_rate:
                self.stats.faults[mode] += 1
                return mode
            return "pass"

    def _serve(self, client: socket.socket) -> None:
        self._track(client)
        with self._lock:
            self.stats.connections += 1
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        connection = _Connection(self, client, upstream)
        threading.Thread(target=connection.pump_responses, name="fault-proxy-down", daemon=True).start()
        connection.pump_requests()


class _Connection:
    """One client connection and its upstream: requests flow up, responses down."""

    def __init__(self, proxy: FaultProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.awaiting_response = False
        self.response_started = threading.Event()
        self.swallowing = False  # a "lost" fault: responses are dropped until the connection is closed

    def pump_requests(self) -> None:
        try:
            while True:
                data = self.client.recv(65536)
                if not data:
                    break
                if not self.awaiting_response:  # the first bytes of a new request
                    fault = self.proxy._draw_fault(data)
                    if fault == "lost":
                        self.swallowing = True
                        threading.Thread(target=self._close_after_stall, name="fault-proxy-lost", daemon=True).start()
                    elif fault != "pass":
                        self._inject(fault)
                        return
                    self.awaiting_response = True
                self.upstream.sendall(data)
        except OSError:
            pass
        finally:
            _close(self.upstream)

    def pump_responses(self) -> None:
        try:
            while True:
                data = self.upstream.recv(65536)
                if not data:
                    break
                if self.swallowing:
                    continue
                if self.awaiting_response:  # the first bytes of this request's response
                    self.awaiting_response = False
                    if self.proxy.delay_s > 0:
                        time.sleep(self.proxy.delay_s)
                self.client.sendall(data)
        except OSError:
            pass
        finally:
            _close(self.client)

    def _close_after_stall(self) -> None:
        self.proxy._closing.wait(self.proxy.stall_s)
        _close(self.client)
        _close(self.upstream)

    def _inject(self, fault: str) -> None:
        if fault == "reset":
            _reset(self.client)
        elif fault == "stall":
            self.proxy._closing.wait(self.proxy.stall_s)
            _close(self.client)
        elif fault == "garbage":
            _send_and_close(self.client, _GARBAGE)
        elif fault == "http503":
            _send_and_close(self.client, _BUSY)
        _close(self.upstream)


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass
    _close(sock)


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets an RST, not a FIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
