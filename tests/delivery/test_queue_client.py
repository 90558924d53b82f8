"""Queue clients read the proxy settings of the environment once, at creation, and still honour them:
HTTP_PROXY routes every request through the proxy, NO_PROXY exempts the queue's host. A real forwarding
HTTP proxy (in this test) in front of the real Azurite. Both clients: the SDK's (make_queue_client) and the
lean per-message one (message_client)."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.harness import worker_settings
from worker.queue.client import make_queue_client, message_client
from worker.settings import QueueSettings


class ForwardingProxy(ThreadingHTTPServer):
    """A plain HTTP forward proxy: takes absolute-form requests, forwards them, records each request line."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Forward)
        self.seen: list[str] = []
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(BaseHTTPRequestHandler):
    server: ForwardingProxy

    def _forward(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        target = urlsplit(self.path)  # absolute form: http://host:port/path?query
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(target.hostname or "", target.port or 80, timeout=10)
        path = target.path + (f"?{target.query}" if target.query else "")
        upstream.request(self.command, path, body=body, headers={k: v for k, v in self.headers.items()
                                                                   if k.lower() not in ("proxy-connection", "connection")})
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture
def forwarding_proxy() -> Iterator[ForwardingProxy]:
    proxy = ForwardingProxy()
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()


def round_trip(client: QueueClient) -> None:
    client.send_message("through the proxy?")
    [received] = client.receive_messages(max_messages=1)
    client.delete_message(received)


@pytest.fixture(params=[make_queue_client, message_client], ids=["sdk", "lean"])
def factory(request: pytest.FixtureRequest) -> Callable[[QueueSettings], QueueClient]:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def no_inherited_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_http_proxy_carries_every_request(azurite: Azurite, queue: QueueClient, queue_name: str,
                                          forwarding_proxy: ForwardingProxy, monkeypatch: pytest.MonkeyPatch,
                                          factory: Callable[[QueueSettings], QueueClient]) -> None:
    monkeypatch.setenv("HTTP_PROXY", forwarding_proxy.url)
    round_trip(factory(worker_settings(azurite, queue_name).queue))
    assert [line.split(" ", 1)[0] for line in forwarding_proxy.seen] == ["POST", "GET", "DELETE"]
    assert all(f"//127.0.0.1:{azurite.port}/" in line for line in forwarding_proxy.seen)


def test_no_proxy_exempts_the_queue_host(azurite: Azurite, queue: QueueClient, queue_name: str,
                                        forwarding_proxy: ForwardingProxy, monkeypatch: pytest.MonkeyPatch,
                                        factory: Callable[[QueueSettings], QueueClient]) -> None:
    monkeypatch.setenv("HTTP_PROXY", forwarding_proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    round_trip(factory(worker_settings(azurite, queue_name).queue))
    assert forwarding_proxy.seen == []


def test_the_environment_is_read_once_not_per_request(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                     forwarding_proxy: ForwardingProxy,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     factory: Callable[[QueueSettings], QueueClient]) -> None:
    client = factory(worker_settings(azurite, queue_name).queue)
    monkeypatch.setenv("HTTP_PROXY", forwarding_proxy.url)  # after creation: this client no longer looks
    round_trip(client)
    assert forwarding_proxy.seen == []
