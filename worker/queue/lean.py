"""The queue client the worker's per-message calls go through: Get Messages, Delete, Update and Put Message
over worker.queue.transport, everything else (queue creation, peek, properties) on the SDK client it wraps.

A drop-in for the QueueClient methods consumer, lease and settle call: the same arguments, QueueMessage
results, and the same exceptions (see transport). Answers are parsed with the standard library's XML parser,
refusing what the service never sends (a DOCTYPE, wrong types, oversized answers) as a DecodeError.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from azure.core.exceptions import DecodeError
from azure.storage.queue import QueueClient, QueueMessage

from worker.queue.transport import BearerToken, NoSigner, QueueHttp, SharedKey, Signer

MAX_BATCH = 32  # the service's most per Get Messages
_TAGS_PER_MESSAGE = 2 + 2 * 8  # <QueueMessage> and its 8 fields, opened and closed (their text is escaped)
_MONTHS = {m: i for i, m in enumerate(("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), 1)}


class LeanQueueClient:
    def __init__(self, sdk: QueueClient, connect_timeout_s: float, read_timeout_s: float, proxy: str | None = None,
                 ca_bundle: str | None = None) -> None:
        self._sdk = sdk
        self.http = QueueHttp(sdk.url, signer_for(sdk), sdk.api_version, connect_timeout_s, read_timeout_s, proxy, ca_bundle)

    def __getattr__(self, name: str) -> Any:  # everything not per-message: the SDK's
        if name.startswith("__") or name == "_sdk":  # copy/pickle probing a half-made instance: not the SDK's
            raise AttributeError(name)
        return getattr(self._sdk, name)

    def receive_messages(self, *, messages_per_page: int | None = None, max_messages: int | None = None,
                         visibility_timeout: int | None = None, **request: Any) -> Received:
        """One Get Messages call of up to min(messages_per_page or max_messages, 32) messages, when iterated."""
        n = min(MAX_BATCH, messages_per_page or max_messages or 1)
        query = [("numofmessages", str(n))]
        if visibility_timeout is not None:
            query.append(("visibilitytimeout", str(visibility_timeout)))
        return Received(lambda: parse_messages(self.http.request("GET", "/messages", query, **_request(request)).body, n))

    def delete_message(self, message: str | QueueMessage, pop_receipt: str | None = None, **request: Any) -> None:
        message_id, receipt = _id_and_receipt(message, pop_receipt)
        self.http.request("DELETE", f"/messages/{quote(message_id, safe='')}", [("popreceipt", receipt)], **_request(request))

    def update_message(self, message: str | QueueMessage, pop_receipt: str | None = None, content: str | None = None, *,
                       visibility_timeout: int | None = None, **request: Any) -> QueueMessage:
        message_id, receipt = _id_and_receipt(message, pop_receipt)
        query = [("popreceipt", receipt), ("visibilitytimeout", str(visibility_timeout or 0))]
        body = None if content is None else _message_xml(content)
        answer = self.http.request("PUT", f"/messages/{quote(message_id, safe='')}", query, body, **_request(request))
        updated = QueueMessage(content=content, id=message_id, pop_receipt=answer.headers.get("x-ms-popreceipt"))
        if visible := answer.headers.get("x-ms-time-next-visible"):
            updated.next_visible_on = _http_date(visible)
        return updated

    def send_message(self, content: str, *, visibility_timeout: int | None = None, time_to_live: int | None = None,
                     **request: Any) -> QueueMessage:
        query = []
        if visibility_timeout is not None:
            query.append(("visibilitytimeout", str(visibility_timeout)))
        if time_to_live is not None:
            query.append(("messagettl", str(time_to_live)))
        answer = self.http.request("POST", "/messages", query, _message_xml(content), **_request(request))
        [sent] = parse_messages(answer.body, at_most=1) or [QueueMessage()]
        sent.content = content
        return sent

    def close(self) -> None:
        self.http.close()
        self._sdk.close()


class Received:
    """What receive_messages returns: iterable, or by_page() with exactly one page (the worker's use)."""

    def __init__(self, fetch: Any) -> None:
        self._fetch = fetch

    def by_page(self) -> Iterator[list[QueueMessage]]:
        yield self._fetch()

    def __iter__(self) -> Iterator[QueueMessage]:
        return iter(self._fetch())


def signer_for(sdk: QueueClient) -> Signer:
    credential = sdk.credential
    if hasattr(credential, "get_token"):
        return BearerToken(credential)
    if credential is None:
        return NoSigner()
    if hasattr(credential, "account_key"):  # azure-storage's SharedKeyCredentialPolicy, or a named key
        return SharedKey(credential.account_name, credential.account_key)
    if hasattr(credential, "named_key"):
        return SharedKey(credential.named_key.name, credential.named_key.key)
    raise TypeError(f"the lean queue path cannot sign with a {type(credential).__name__}")


def parse_messages(body: bytes, at_most: int = MAX_BATCH) -> list[QueueMessage]:
    """The QueueMessage elements of a Get or Put Messages answer (no more than asked for); a DecodeError for anything else."""
    if b"<!" in body:  # DOCTYPE or ENTITY (no entity expansion, ever) or CDATA: not the service's
        raise DecodeError("unexpected markup in a queue answer")
    if body.count(b"<") > 3 + _TAGS_PER_MESSAGE * at_most:  # deep or wide junk: refused before parsing it
        raise DecodeError("more elements in a queue answer than the messages asked for can have")
    try:
        root = ET.fromstring(body)
        if root.tag != "QueueMessagesList":
            raise ValueError(f"root element {root.tag[:40]!r}")
        messages = [_message(element) for element in root.iterfind("QueueMessage")]
        if len(messages) > at_most:
            raise ValueError(f"{len(messages)} messages where at most {at_most} were asked for")
        return messages
    except (ET.ParseError, ValueError, KeyError, TypeError, IndexError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"a queue answer that could not be read: {type(exc).__name__}: {str(exc)[:200]}") from None


def _message(element: ET.Element) -> QueueMessage:
    fields = {child.tag: child.text or "" for child in element if not len(child) or _nested(child)}
    message_id, receipt = fields["MessageId"], fields["PopReceipt"]
    if not message_id or not receipt:
        raise ValueError("a message without an id or pop receipt")
    count = fields.get("DequeueCount")
    return QueueMessage(
        content=fields.get("MessageText"), id=message_id, pop_receipt=receipt,
        dequeue_count=int(count) if count is not None else None,
        inserted_on=_http_date(fields["InsertionTime"]) if "InsertionTime" in fields else None,
        expires_on=_http_date(fields["ExpirationTime"]) if "ExpirationTime" in fields else None,
        next_visible_on=_http_date(fields["TimeNextVisible"]) if "TimeNextVisible" in fields else None,
    )


def _nested(element: ET.Element) -> bool:
    raise ValueError(f"markup inside <{element.tag[:40]}>")


def _http_date(text: str) -> datetime:
    """RFC 1123 ("Wed, 03 Dec 2026 20:19:35 GMT") as an aware UTC datetime, ~10× cheaper than email.utils."""
    _, day, month, year, clock, zone = text.split()
    if zone != "GMT":
        raise ValueError(f"a date not in GMT: {text[:40]!r}")
    hour, minute, second = clock.split(":")
    return datetime(int(year), _MONTHS[month], int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc)


def _message_xml(content: str) -> bytes:
    return f"<?xml version='1.0' encoding='utf-8'?>\n<QueueMessage><MessageText>{escape(content)}</MessageText></QueueMessage>".encode()


def _id_and_receipt(message: str | QueueMessage, pop_receipt: str | None) -> tuple[str, str]:
    if isinstance(message, QueueMessage):
        return message.id, pop_receipt or message.pop_receipt or ""
    return message, pop_receipt or ""


def _request(options: dict[str, Any]) -> dict[str, Any]:
    """The SDK's per-call options the worker uses, as transport arguments; others are refused, not ignored."""
    known = {"connection_timeout": "connect_timeout_s", "read_timeout": "read_timeout_s", "retry_total": "retries"}
    if unknown := set(options) - set(known):
        raise TypeError(f"the lean queue path does not take {sorted(unknown)}")
    return {known[key]: value for key, value in options.items()}
