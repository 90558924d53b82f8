"""Azure Scheduled Events: the document and the HTTP client (the watcher thread is in event_watcher)."""

from __future__ import annotations

import email.utils
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import httpx

from supervisor.vm.imds import MAX_DOCUMENT_BYTES, ImdsError, InstanceInfo, fetch_instance_info, is_json_int, send, status_error
from worker.common import jsonsafe

log = logging.getLogger(__name__)

API_VERSION = "2020-07-01"
# Azure enables Scheduled Events for the VM on the first call, which can take
# up to two minutes to answer.
FIRST_REQUEST_TIMEOUT_S = 120.0
EVENT_FIELD_MAX_DEPTH = 4  # every field read is a scalar or a list of strings


@dataclass(frozen=True)
class ScheduledEvent:
    event_id: str
    event_type: str
    status: str
    resources: tuple[str, ...]
    not_before: datetime | None  # aware UTC; None once Started (NotBefore "")
    source: str
    duration_s: int
    description: str


@dataclass(frozen=True)
class EventsDocument:
    incarnation: int
    events: tuple[ScheduledEvent, ...]
    # One line per event that could not be read (skipped) or read only in part; the rest still counts.
    problems: tuple[str, ...] = ()


def parse_document(raw: bytes | str) -> EventsDocument:
    """The document, read event by event and field by field.

    Each event is taken apart before its fields are decoded, so a neighbour's event that cannot be read
    (thousands of nested arrays, wrong types, NaN) is skipped alone, with one line in `problems`, and
    never hides an event for this VM."""
    try:
        members = jsonsafe.object_members(jsonsafe.as_text(raw, MAX_DOCUMENT_BYTES))
        incarnation = jsonsafe.loads(members.get("DocumentIncarnation", "null"))
        events_text = members.get("Events", "null")
        items = jsonsafe.array_items(events_text) if events_text.startswith("[") else None
    except jsonsafe.JsonError as exc:
        raise ImdsError(f"scheduled events: not valid JSON ({exc})") from None
    if not is_json_int(incarnation):
        raise ImdsError(f"scheduled events: DocumentIncarnation must be an integer, got {incarnation!r:.80}")
    if items is None:
        raise ImdsError(f"scheduled events: Events must be a list, got {events_text:.80}")
    parsed: list[ScheduledEvent] = []
    problems: list[str] = []
    for index, item in enumerate(items):
        try:
            parsed.append(_parse_event(index, item, problems))
        except ImdsError as exc:
            problems.append(f"{exc}; event skipped")
    return EventsDocument(incarnation=incarnation, events=tuple(parsed), problems=tuple(problems))


def _parse_event(index: int, item: str, problems: list[str]) -> ScheduledEvent:
    """Raises ImdsError when a field that decides what to do cannot be read; the others fall back to
    a default, with a line in `problems`. Only the fields read here are ever decoded."""
    where = f"scheduled events: Events[{index}]"
    try:
        members = jsonsafe.object_members(item)
    except jsonsafe.JsonError as exc:
        raise ImdsError(f"{where}: expected an object ({exc}), got {item:.80}") from None

    def field(key: str, kind: type, default: Any = None) -> Any:
        if key not in members:
            if default is None:
                raise ImdsError(f"{where}: missing {key}")
            return default
        try:
            value = jsonsafe.loads(members[key], max_depth=EVENT_FIELD_MAX_DEPTH)
        except jsonsafe.JsonError as exc:
            value = _Unreadable(str(exc))
        if not isinstance(value, kind) or isinstance(value, bool):
            if default is None:
                raise ImdsError(f"{where}: {key} must be {kind.__name__}, got {value!r:.80}")
            problems.append(f"{where}: {key} must be {kind.__name__}, got {value!r:.80}; read as {default!r}")
            return default
        return value

    event_id = field("EventId", str)
    where = f"{where} ({event_id:.80})"
    resources = field("Resources", list)
    if not all(isinstance(r, str) for r in resources):
        raise ImdsError(f"{where}: Resources must be a list of strings, got {resources!r:.80}")
    try:
        not_before = _parse_not_before(where, field("NotBefore", str))
    except ImdsError as exc:  # read as "no NotBefore": drained for at once, the careful reading
        problems.append(f"{exc}; read as due now")
        not_before = None
    return ScheduledEvent(
        event_id=event_id,
        event_type=field("EventType", str),
        status=field("EventStatus", str),
        resources=tuple(resources),
        not_before=not_before,
        source=field("EventSource", str, ""),
        duration_s=field("DurationInSeconds", int, -1),
        description=field("Description", str, ""),
    )


class _Unreadable:
    """A field whose text is not JSON we accept: shown in the problem line by why, never by its text."""

    def __init__(self, why: str) -> None:
        self.why = why

    def __repr__(self) -> str:
        return f"unreadable JSON ({self.why})"


def _parse_not_before(where: str, text: str) -> datetime | None:
    if not text.strip():
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        raise ImdsError(f"{where}: NotBefore is not an RFC 1123 date: {text!r:.80}") from None
    if when.tzinfo is None:  # "-0000" means UTC in RFC 2822 terms
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


class AzureScheduledEvents:
    name = "Azure Scheduled Events"
    acknowledges = True

    def __init__(self, endpoint: str, request_timeout_s: float,
                 first_request_timeout_s: float = FIRST_REQUEST_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.url = f"{endpoint.rstrip('/')}/metadata/scheduledevents"
        self._params = {"api-version": API_VERSION}
        self._request_timeout_s = request_timeout_s
        self._first_request_timeout_s = max(first_request_timeout_s, request_timeout_s)
        self._succeeded = False
        self._client = httpx.Client(trust_env=False)

    def poll(self) -> EventsDocument:
        timeout = self._request_timeout_s if self._succeeded else self._first_request_timeout_s
        response = send(self._client, "GET", self.url, params=self._params, timeout=timeout)
        if response.status_code != 200:
            raise status_error("GET", self.url, response)
        document = parse_document(response.content)
        self._succeeded = True
        return document

    def acknowledge(self, event_id: str) -> None:
        # Serialised by hand so the body is byte-for-byte the documented one.
        body = json.dumps({"StartRequests": [{"EventId": event_id}]}).encode()
        response = send(self._client, "POST", self.url, params=self._params, content=body,
                        headers={"Content-Type": "application/json"}, timeout=self._request_timeout_s)
        if not 200 <= response.status_code < 300:
            raise status_error("POST", self.url, response)
        log.info("acknowledged scheduled event %s", event_id)

    def next_poll_in(self, interval_s: float) -> float:
        return interval_s

    def instance_info(self, timeout_s: float | None = None) -> InstanceInfo:
        return fetch_instance_info(self.endpoint, timeout_s or self._request_timeout_s)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AzureScheduledEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
