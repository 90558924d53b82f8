"""HTTP for the per-message queue calls: keep-alive connections (http.client), request signing, retries and the
error shapes of azure-core, without azure-core's pipeline (most of a message's CPU: see docs/benchmarks.md).

Connections: a small pool of keep-alive HTTP(S) connections shared by the threads of one client; a pooled
connection the server has closed meanwhile is dropped before use, and a request that finds it closed while
sending is sent once more on a new one. Proxy from HTTP(S)_PROXY/NO_PROXY and CA bundle from
REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE, read once (as the SDK clients here do); TLS verification always on.
Retries as the SDK's ExponentialRetry configured in worker.queue.client: 3 more tries after ~3, 5 and 9 s, on
connection errors, timeouts, 408, 429 and 5xx (not 501, 505).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import random
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from email.utils import formatdate
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlsplit

from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

STORAGE_SCOPE = "https://storage.azure.com/.default"
MAX_ANSWER_BYTES = 16 * 2**20  # 32 messages of 64 KiB, XML-escaped, fit several times over
RETRIES = 3
_TOKEN_REFRESH_S = 300  # as azure-core's bearer token policy: a new token 5 minutes before expiry
_CLOSED_WHILE_SENDING = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_ERROR_PART = re.compile(rb"<(Code|Message)>([^<]{0,1000})</\1>")
_ERRORS: dict[int, type[HttpResponseError]] = {401: ClientAuthenticationError, 403: ClientAuthenticationError,
                                               404: ResourceNotFoundError, 409: ResourceExistsError}

Query = Sequence[tuple[str, str]]


class Signer(Protocol):
    def sign(self, method: str, path: str, query: Query, headers: dict[str, str]) -> None: ...


class SharedKey:
    """Shared Key authorization, as azure-storage's SharedKeyCredentialPolicy signs (x-ms-date, no Date)."""

    def __init__(self, account_name: str, account_key: str) -> None:
        self.account_name = account_name
        self._key = base64.b64decode(account_key)

    def sign(self, method: str, path: str, query: Query, headers: dict[str, str]) -> None:
        length = headers.get("Content-Length", "")
        standard = f"{method}\n\n\n{'' if length == '0' else length}\n\n{headers.get('Content-Type', '')}\n\n\n\n\n\n\n"
        ms_headers = "".join(f"{k.lower()}:{v}\n" for k, v in sorted(headers.items(), key=lambda kv: kv[0].lower())
                             if k.lower().startswith("x-ms-"))
        resource = f"/{self.account_name}{path}" + "".join(f"\n{k.lower()}:{v}" for k, v in sorted(query))
        digest = hmac.new(self._key, (standard + ms_headers + resource).encode(), hashlib.sha256).digest()
        headers["Authorization"] = f"SharedKey {self.account_name}:{base64.b64encode(digest).decode()}"


class NoSigner:
    """A SAS in the URL (or public access): nothing to add."""

    def sign(self, method: str, path: str, query: Query, headers: dict[str, str]) -> None:
        pass


class BearerToken:
    """Any azure-identity TokenCredential (managed identity in production); refreshed before it expires."""

    https_only = True

    def __init__(self, credential: Any, scope: str = STORAGE_SCOPE) -> None:
        self._credential = credential
        self._scope = scope
        self._token: Any = None
        self._lock = threading.Lock()

    def sign(self, method: str, path: str, query: Query, headers: dict[str, str]) -> None:
        token = self._token
        if token is None or token.expires_on - time.time() < _TOKEN_REFRESH_S:
            with self._lock:
                if self._token is None or self._token.expires_on - time.time() < _TOKEN_REFRESH_S:
                    self._token = self._credential.get_token(self._scope)
                token = self._token
        headers["Authorization"] = f"Bearer {token.token}"


class Headers:
    """A response's headers by lower-case name (the first of repeated ones), for what this module and
    http.client read: http.client's own parsing goes through the email package, ~17 % of a worker's CPU."""

    def __init__(self, lines: list[bytes]) -> None:
        self._values: dict[str, str] = {}
        for line in lines:
            name, colon, value = line.decode("iso-8859-1").partition(":")
            if colon:
                self._values.setdefault(name.strip().lower(), value.strip())

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name.lower(), default)

    def get_all(self, name: str, default: Any = None) -> list[str] | Any:
        value = self._values.get(name.lower())
        return default if value is None else [value]

    def items(self) -> list[tuple[str, str]]:
        return list(self._values.items())


class LeanResponse(http.client.HTTPResponse):
    """HTTPResponse with the header block read into Headers; otherwise http.client's begin(), unchanged."""

    def begin(self) -> None:
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = Headers(http.client._read_headers(self.fp))
        encoding = self.headers.get("transfer-encoding")
        self.chunked = bool(encoding and encoding.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked and length.isdigit():
            self.length = int(length)
        if status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED) or 100 <= status < 200 or self._method == "HEAD":
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


class Answer:
    def __init__(self, status: int, headers: Headers, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body


class QueueHttp:
    """One queue's endpoint: `request` sends one call (with retries) and returns the answer, or raises as azure-core
    would (ServiceRequestError, ServiceResponseError, HttpResponseError and its subclasses with status_code and
    error_code)."""

    def __init__(self, url: str, signer: Signer, api_version: str, connect_timeout_s: float, read_timeout_s: float,
                 proxy: str | None = None, ca_bundle: str | None = None) -> None:
        parts = urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.https else 80)
        self.netloc = parts.netloc.rpartition("@")[2]
        self.path = parts.path.rstrip("/")  # the queue's: /<queue> (or /<account>/<queue> on an emulator)
        self.sas: list[tuple[str, str]] = [(k, unquote(v)) for k, _, v in (p.partition("=") for p in parts.query.split("&") if p)]
        self.signer = signer
        self.api_version = api_version
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.user_agent = "spot-supervisor (lean queue path)"
        self._tls = ssl.create_default_context(cafile=ca_bundle or _default_ca_bundle()) if self.https else None
        self._proxy = urlsplit(proxy) if proxy else None
        self._proxy_auth = _basic_auth(self._proxy) if self._proxy else None
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(self, method: str, path: str, query: Query = (), body: bytes | None = None, *,
                connect_timeout_s: float | None = None, read_timeout_s: float | None = None,
                retries: int | None = None) -> Answer:
        """`path` below the queue's (e.g. "/messages"); `query` unencoded. Retries as the module says."""
        full_path = self.path + path
        target = full_path + "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in (*query, *self.sas)) if query or self.sas else full_path
        if self._proxy is not None and not self.https:
            target = f"http://{self.netloc}{target}"  # absolute form, for the proxy
        if getattr(self.signer, "https_only", False) and not self.https:  # as azure-core: never a token in the clear
            raise ServiceRequestError("Bearer token authentication is not permitted for non-TLS protected (non-https) URLs.")
        tries = 1 + (RETRIES if retries is None else retries)
        for attempt in range(1, tries + 1):
            try:
                answer = self._send(method, full_path, target, query, body, connect_timeout_s or self.connect_timeout_s,
                                    read_timeout_s or self.read_timeout_s)
            except (ServiceRequestError, ServiceResponseError):
                if attempt == tries:
                    raise
            else:
                if answer.status < 300:
                    return answer
                if attempt == tries or not _retried(answer.status):
                    raise _error(answer)
            time.sleep(random.uniform(2 ** attempt, 2 + 2 ** attempt))  # 1 + 2^n ± 1, the SDK's ExponentialRetry
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _send(self, method: str, path: str, target: str, query: Query, body: bytes | None, connect_timeout_s: float,
              read_timeout_s: float) -> Answer:
        headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": self.api_version, "User-Agent": self.user_agent,
                   "Content-Length": str(len(body)) if body else "0"}
        if body:
            headers["Content-Type"] = "application/xml; charset=utf-8"
        if self._proxy_auth and not self.https:
            headers["Proxy-Authorization"] = self._proxy_auth
        self.signer.sign(method, path, query, headers)
        conn, reused = self._take(connect_timeout_s)
        try:
            try:
                answer = self._exchange(conn, method, target, body, headers, read_timeout_s)
            except _CLOSED_WHILE_SENDING:
                if not reused:
                    raise
                conn.close()  # the server closed it as we reused it: once more on a new connection
                conn, reused = self._new(connect_timeout_s), False
                answer = self._exchange(conn, method, target, body, headers, read_timeout_s)
        except ServiceRequestError:
            conn.close()
            raise
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ServiceResponseError(f"{method} {path}: {type(exc).__name__}: {exc}", error=exc) from exc
        except BaseException:
            conn.close()
            raise
        return answer

    def _exchange(self, conn: http.client.HTTPConnection, method: str, target: str, body: bytes | None,
                  headers: dict[str, str], read_timeout_s: float) -> Answer:
        if conn.sock is None:
            try:
                conn.connect()
            except (OSError, http.client.HTTPException) as exc:
                raise ServiceRequestError(f"could not connect to {self.netloc}: {type(exc).__name__}: {exc}", error=exc) from exc
        conn.sock.settimeout(read_timeout_s)
        conn.request(method, target, body=body, headers=headers)
        response = conn.getresponse()
        length = response.getheader("Content-Length")
        if length is not None and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            raise http.client.HTTPException(f"an answer of {length} bytes (at most {MAX_ANSWER_BYTES} taken)")
        data = response.read(MAX_ANSWER_BYTES + 1)
        if len(data) > MAX_ANSWER_BYTES:
            raise http.client.HTTPException(f"an answer of more than {MAX_ANSWER_BYTES} bytes")
        if not response.isclosed():  # left unread: the connection cannot carry another request
            raise http.client.HTTPException("an answer longer than it said")
        if response.will_close:
            conn.close()
        else:
            with self._lock:
                self._idle.append(conn)
        return Answer(response.status, response.msg, data)  # type: ignore[arg-type]

    def _take(self, connect_timeout_s: float) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                return self._new(connect_timeout_s), False
            if conn.sock is not None and not _readable(conn.sock):  # readable while idle: closed by the server, or junk
                return conn, True
            conn.close()

    def _new(self, connect_timeout_s: float) -> http.client.HTTPConnection:
        conn = self._connection(connect_timeout_s)
        conn.response_class = LeanResponse
        return conn

    def _connection(self, connect_timeout_s: float) -> http.client.HTTPConnection:
        proxy = self._proxy
        if proxy is None:
            if self._tls is not None:
                return http.client.HTTPSConnection(self.host, self.port, timeout=connect_timeout_s, context=self._tls)
            return http.client.HTTPConnection(self.host, self.port, timeout=connect_timeout_s)
        proxy_port = proxy.port or (443 if proxy.scheme == "https" else 80)
        if self._tls is None:
            return http.client.HTTPConnection(proxy.hostname or "", proxy_port, timeout=connect_timeout_s)
        conn = http.client.HTTPSConnection(proxy.hostname or "", proxy_port, timeout=connect_timeout_s, context=self._tls)
        conn.set_tunnel(self.host, self.port, headers={"Proxy-Authorization": self._proxy_auth} if self._proxy_auth else None)
        return conn


def _retried(status: int) -> bool:
    return status in (408, 429) or (status >= 500 and status not in (501, 505))


def _error(answer: Answer) -> HttpResponseError:
    """As azure-storage's process_storage_error: the class by status, error_code from the header or the body."""
    parts = {name.decode(): value.decode(errors="replace") for name, value in _ERROR_PART.findall(answer.body[:65536])}
    code = answer.headers.get("x-ms-error-code") or parts.get("Code") or ""
    message = (parts.get("Message") or http.client.responses.get(answer.status, "")).strip()
    exc = _ERRORS.get(answer.status, HttpResponseError)(message=f"{message}\nErrorCode:{code}" if code else message)
    exc.status_code = answer.status
    exc.reason = http.client.responses.get(answer.status, "")
    exc.error_code = code or None  # type: ignore[attr-defined]  # set the same way by azure-storage
    return exc


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError):
        return True


def _basic_auth(proxy: Any) -> str | None:
    if not proxy.username:
        return None
    pair = f"{unquote(proxy.username)}:{unquote(proxy.password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


def _default_ca_bundle() -> str | None:
    """requests' default (certifi), so verification trusts what the SDK path trusts."""
    try:
        import certifi
    except ImportError:
        return None
    return str(certifi.where())
