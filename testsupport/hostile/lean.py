"""A queue endpoint that answers whatever a test scripts: for the attack tests of the lean queue path.

`HostileQueue.answer` is the raw bytes sent back to every request (status line, headers, body), or None
to read the request and never answer. `requests` counts the requests read, `last_target` is the last
one's request target. Speaks just enough HTTP/1.1 to read a request (headers, a Content-Length body).
"""

from __future__ import annotations

import socket
import threading
from types import TracebackType

from testsupport.azurite import ACCOUNT, ACCOUNT_KEY


def http_answer(status: int, body: bytes = b"", headers: dict[str, str] | None = None, reason: str = "Whatever") -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return head.encode() + b"\r\n" + body


def messages_xml(*messages: str) -> bytes:
    return ("<?xml version=\"1.0\" encoding=\"utf-8\"?><QueueMessagesList>" + "".join(messages) + "</QueueMessagesList>").encode()


def message_xml(message_id: str = "id-1", receipt: str = "receipt-1", text: str = "hello", dequeue_count: str = "1",
                inserted: str = "Wed, 03 Dec 2026 20:19:35 GMT") -> str:
    return (f"<QueueMessage><MessageId>{message_id}</MessageId><InsertionTime>{inserted}</InsertionTime>"
            f"<ExpirationTime>Wed, 10 Dec 2026 20:19:35 GMT</ExpirationTime><PopReceipt>{receipt}</PopReceipt>"
            f"<TimeNextVisible>Wed, 03 Dec 2026 20:20:35 GMT</TimeNextVisible><DequeueCount>{dequeue_count}</DequeueCount>"
            f"<MessageText>{text}</MessageText></QueueMessage>")


class HostileQueue:
    def __init__(self) -> None:
        self.answer: bytes | None = http_answer(200, messages_xml())
        self.requests = 0
        self.last_target = ""  # of the last request line
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._clients: list[socket.socket] = []

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
                f"QueueEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};")

    def __enter__(self) -> HostileQueue:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._server.close()
        with self._lock:
            for client in self._clients:
                client.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        buffered = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buffered:
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buffered += chunk
                head, _, buffered = buffered.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffered) < length:
                    buffered += client.recv(65536)
                buffered = buffered[length:]
                with self._lock:
                    self.requests += 1
                    self.last_target = head.split(b"\r\n", 1)[0].split(b" ")[1].decode(errors="replace")
                answer = self.answer
                if answer is None:
                    self._stop.wait()  # never answers
                    return
                client.sendall(answer)
        except OSError:
            return
