"""The fault/latency proxy the delivery tests and the latency bench put in front of Azurite."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from testsupport.proxy import FaultProxy


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    deletes = 0

    def do_GET(self) -> None:  # noqa: N802
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_DELETE(self) -> None:  # noqa: N802
        _Hello.deletes += 1
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _get(port: int, timeout: float = 5.0, connection: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    conn = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", "/")
    response = conn.getresponse()
    return response.status, response.read()


def test_passes_requests_through_and_delays_each_response(server_port: int) -> None:
    with FaultProxy(server_port, delay_s=0.05) as proxy:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        started = time.monotonic()
        for _ in range(3):  # one keep-alive connection, three responses, each delayed
            assert _get(proxy.port, connection=conn) == (200, b"hello")
        assert time.monotonic() - started >= 0.15
        assert proxy.stats.requests == 3
        assert proxy.stats.connections == 1


def test_http503_answers_without_reaching_the_server(server_port: int) -> None:
    with FaultProxy(server_port, mode="http503") as proxy:
        assert _get(proxy.port)[0] == 503
        assert proxy.stats.faults["http503"] == 1


@pytest.mark.parametrize("mode", ["reset", "garbage"])
def test_reset_and_garbage_break_the_request(server_port: int, mode: str) -> None:
    with FaultProxy(server_port, mode=mode) as proxy:
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            _get(proxy.port)
        proxy.set_fault("pass")
        assert _get(proxy.port) == (200, b"hello")


def test_stall_holds_the_request_until_the_client_gives_up(server_port: int) -> None:
    with FaultProxy(server_port, mode="stall", stall_s=30) as proxy:
        with pytest.raises(TimeoutError):
            _get(proxy.port, timeout=0.3)


def test_fault_rate_hits_only_a_share_of_requests(server_port: int) -> None:
    with FaultProxy(server_port, mode="http503", fault_rate=0.5, seed=7) as proxy:
        statuses = [_get(proxy.port)[0] for _ in range(40)]
        assert 0 < statuses.count(503) < 40
        assert statuses.count(503) == proxy.stats.faults["http503"]
        assert set(statuses) == {200, 503}


def test_lost_mode_forwards_the_request_but_never_answers(server_port: int) -> None:
    """A request whose response is lost reached the server; the client hears nothing until the stall ends.
    Narrowed to DELETE, a GET on the same proxy passes."""
    _Hello.deletes = 0
    with FaultProxy(server_port, stall_s=1.5) as proxy:
        proxy.set_fault("lost", methods=("DELETE",))
        assert _get(proxy.port) == (200, b"hello")
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        started = time.monotonic()
        conn.request("DELETE", "/")
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            conn.getresponse()
        assert time.monotonic() - started >= 1.4
        assert _Hello.deletes == 1
        assert proxy.stats.faults["lost"] == 1
