"""Azure Scheduled Events: the document, the HTTP client, and the polling thread.

The watcher turns each successfully fetched document into decisions via
`EvictionPolicy` and hands them to a callback. A failed poll is only ever a
failed poll: it is retried, never read as "evicted" nor as "nothing pending".
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from supervisor.imds import ImdsError, is_json_int, load_json, send, status_error
from worker.backoff import Backoff

if TYPE_CHECKING:
    from supervisor.eviction import Decision, EvictionPolicy

log = logging.getLogger(__name__)

API_VERSION = "2020-07-01"
# Azure enables Scheduled Events for the VM on the first call, which can take
# up to two minutes to answer.
FIRST_REQUEST_TIMEOUT_S = 120.0


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


def parse_document(raw: bytes | str) -> EventsDocument:
    data = load_json(raw, "scheduled events")
    if not isinstance(data, dict):
        raise ImdsError(f"scheduled events: expected a JSON object, got {type(data).__name__}")
    incarnation = data.get("DocumentIncarnation")
    if not is_json_int(incarnation):
        raise ImdsError(f"scheduled events: DocumentIncarnation must be an integer, got {incarnation!r}")
    events = data.get("Events")
    if not isinstance(events, list):
        raise ImdsError(f"scheduled events: Events must be a list, got {events!r:.80}")
    return EventsDocument(incarnation=incarnation, events=tuple(_parse_event(i, e) for i, e in enumerate(events)))


def _parse_event(index: int, item: Any) -> ScheduledEvent:
    where = f"scheduled events: Events[{index}]"
    if not isinstance(item, dict):
        raise ImdsError(f"{where}: expected an object, got {item!r:.80}")

    def field(key: str, kind: type, default: Any = None) -> Any:
        if key not in item:
            if default is None:
                raise ImdsError(f"{where}: missing {key}")
            return default
        value = item[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ImdsError(f"{where}: {key} must be {kind.__name__}, got {value!r:.80}")
        return value

    event_id = field("EventId", str)
    resources = field("Resources", list)
    if not all(isinstance(r, str) for r in resources):
        raise ImdsError(f"{where}: Resources must be a list of strings, got {resources!r:.80}")
    return ScheduledEvent(
        event_id=event_id,
        event_type=field("EventType", str),
        status=field("EventStatus", str),
        resources=tuple(resources),
        not_before=_parse_not_before(where, field("NotBefore", str)),
        source=field("EventSource", str, ""),
        duration_s=field("DurationInSeconds", int, -1),
        description=field("Description", str, ""),
    )


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


class EventSource(Protocol):
    """Where eviction notices come from (Azure now; AWS/GCP spot notices later)."""

    def poll(self) -> EventsDocument:
        """The current document; raises ImdsError on any failure."""
        ...

    def acknowledge(self, event_id: str) -> None:
        """Approve the event so it starts now; raises ImdsError on failure."""
        ...


class AzureScheduledEvents:
    def __init__(self, endpoint: str, request_timeout_s: float,
                 first_request_timeout_s: float = FIRST_REQUEST_TIMEOUT_S) -> None:
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

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> AzureScheduledEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventWatcher(threading.Thread):
    """Polls an EventSource and reports decisions through `on_decision`.

    `on_decision` runs on this thread: it should only queue the decision and
    wake the supervisor's main loop.
    """

    def __init__(self, source: EventSource, policy: EvictionPolicy, on_decision: Callable[[Decision], None], *,
                 poll_interval_s: float = 1.0, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.time, name: str = "scheduled-events") -> None:
        super().__init__(name=name, daemon=True)
        self._source = source
        self._policy = policy
        self._on_decision = on_decision
        self._poll_interval_s = poll_interval_s
        # A short cap: while IMDS misbehaves we still look often enough to
        # catch a 30 s eviction notice.
        self._backoff = backoff or Backoff(base_s=0.5, cap_s=max(4.0, poll_interval_s))
        self._clock = clock
        self._stopping = threading.Event()
        self.incarnation: int | None = None
        self.last_success: float | None = None
        self.consecutive_failures = 0

    def stop(self, timeout_s: float | None = 5.0) -> None:
        """Ask the thread to end and wait for it (a request in flight ends at its timeout)."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._stopping.wait(self.poll_once())

    def poll_once(self) -> float:
        """One poll and its consequences; returns how long to wait before the next."""
        try:
            document = self._source.poll()
        except ImdsError as exc:
            return self._failed(str(exc), exc.retry_after_s)
        except Exception as exc:  # a bug must not end eviction watching
            log.exception("scheduled events poll raised unexpectedly")
            return self._failed(f"{type(exc).__name__}: {exc}", None)

        if self.consecutive_failures:
            log.info("scheduled events answering again after %d failed poll(s)", self.consecutive_failures)
        self.consecutive_failures = 0
        self._backoff.reset()
        self.last_success = self._clock()
        if document.incarnation != self.incarnation:
            log.info("scheduled events incarnation %s -> %s: %d event(s)",
                     self.incarnation, document.incarnation, len(document.events))
            self.incarnation = document.incarnation
        try:
            decisions = self._policy.observe(document, self._clock())
        except Exception:
            log.exception("eviction policy failed on incarnation %s", document.incarnation)
            return self._poll_interval_s
        for decision in decisions:
            try:
                self._on_decision(decision)
            except Exception:
                log.exception("on_decision callback failed for %r", decision)
        return self._poll_interval_s

    def _failed(self, message: str, retry_after_s: float | None) -> float:
        self.consecutive_failures += 1
        delay = self._backoff.next_delay()
        if retry_after_s is not None:
            # Honoured, but never beyond the cap: missing an eviction notice
            # costs more than a few extra requests to a throttled IMDS.
            delay = max(delay, min(retry_after_s, self._backoff.cap_s))
        level = logging.WARNING if self.consecutive_failures == 1 else logging.INFO
        log.log(level, "scheduled events poll failed (%d in a row), retrying in %.1fs: %s",
                self.consecutive_failures, delay, message)
        return delay
