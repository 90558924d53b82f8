"""Azure Storage Queue clients from settings, and the error shapes we act on."""

from __future__ import annotations

import logging
import os
from typing import Any, cast
from urllib.parse import urlsplit

import requests
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
)
from azure.storage.queue import ExponentialRetry, QueueClient

from worker.settings import QueueSettings

log = logging.getLogger(__name__)


def make_queue_client(settings: QueueSettings, name: str | None = None) -> QueueClient:
    """A client with no encode/decode policy: this package encodes message text itself,
    so an undecodable message can be moved to poison with its exact original text."""
    kwargs: dict[str, Any] = {
        "connection_timeout": min(10.0, settings.request_timeout_s),
        "read_timeout": settings.request_timeout_s,
        # The SDK's default waits 15 s before its first retry: far too long when a
        # drain may be waiting on this call. Our own loops back off on top of this.
        "retry_policy": ExponentialRetry(initial_backoff=1, increment_base=2, retry_total=3, random_jitter_range=1),
    }
    if settings.api_version:
        kwargs["api_version"] = settings.api_version
    queue_name = name or settings.name
    if settings.connection_string:
        url = QueueClient.from_connection_string(settings.connection_string, queue_name).url  # no request made
        return QueueClient.from_connection_string(settings.connection_string, queue_name, **kwargs, **environment_once(url))
    from azure.identity import ManagedIdentityCredential

    credential = ManagedIdentityCredential(client_id=settings.client_id or None)
    return QueueClient(settings.account_url, queue_name, credential=credential, **kwargs, **environment_once(settings.account_url))


def message_client(settings: QueueSettings, name: str | None = None) -> QueueClient:
    """The client for the per-message calls (receive, delete, update, send): the lean path over http.client, with
    the SDK client of make_queue_client for the rest. Same credentials, proxy, CA bundle and timeouts. Typed as
    the QueueClient it stands in for (worker.queue.lean says which calls it answers itself)."""
    from worker.queue.lean import LeanQueueClient  # here: the supervisor, which imports this module, never needs it

    sdk = make_queue_client(settings, name)
    lean = LeanQueueClient(sdk, min(10.0, settings.request_timeout_s), settings.request_timeout_s,
                           environ_proxy(sdk.url), environ_ca_bundle())
    return cast(QueueClient, lean)


def environ_proxy(url: str) -> str | None:
    """The proxy for this URL from HTTP(S)_PROXY/ALL_PROXY, unless NO_PROXY exempts its host."""
    proxies = requests.utils.get_environ_proxies(url)
    return proxies.get(urlsplit(url).scheme) or proxies.get("all")


def environ_ca_bundle() -> str | None:
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or None


def environment_once(url: str) -> dict[str, Any]:
    """What requests would otherwise look up in the environment on every call (its trust_env), read once for
    this queue's URL: the proxy from HTTP(S)_PROXY unless NO_PROXY exempts the host, and a CA bundle from
    REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE. The lookup per call costs ~0.2 ms of CPU, a few percent of a message;
    it also consults ~/.netrc, whose credentials have no place next to Shared Key or token auth."""
    options: dict[str, Any] = {"use_env_settings": False}
    if proxies := requests.utils.get_environ_proxies(url):
        options["proxies"] = proxies
    if bundle := environ_ca_bundle():
        options["connection_verify"] = bundle
    return options


def ensure_queue(client: QueueClient) -> None:
    try:
        client.create_queue()
    except ResourceExistsError:
        pass


def is_lease_lost(exc: Exception) -> bool:
    """True when an update/delete failed because our pop receipt is no longer valid:
    the message was deleted, or its lease expired and someone else received it
    (not when the queue itself is missing: that says nothing about the message)."""
    if is_queue_missing(exc):
        return False
    if isinstance(exc, ResourceNotFoundError):
        return True
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "error_code", None) or ""
        return code in ("MessageNotFound", "PopReceiptMismatch") or exc.status_code == 404
    return False


def is_queue_missing(exc: Exception) -> bool:
    return isinstance(exc, HttpResponseError) and (getattr(exc, "error_code", None) or "") == "QueueNotFound"


def is_auth_error(exc: Exception) -> bool:
    return isinstance(exc, HttpResponseError) and exc.status_code in (401, 403)


def describe(exc: Exception) -> str:
    """One line for a log: status and service error code when there is one."""
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "error_code", None)
        first = (exc.message or "").splitlines()[0] if exc.message else type(exc).__name__
        return f"HTTP {exc.status_code} {code or ''}: {first}".replace("  ", " ")
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
