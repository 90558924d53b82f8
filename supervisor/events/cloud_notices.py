"""What AWS and Google Cloud say, as the documents the one eviction policy reads.

Neither cloud has events with ids, incarnations or acknowledgements: a source says which
notices stand now, and `NoticeBook` gives each a stable id and a NotBefore fixed when it
was first seen, and counts the document's incarnation up whenever the set changes. The
policy then drains, holds and resumes (a notice that goes away) exactly as on Azure.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from supervisor.events.azure import EventsDocument, ScheduledEvent
from supervisor.vm.imds import ImdsError, load_json
from worker.common.text import one_line

# No metadata answer we read is anywhere near this; more is garbage, refused before decoding.
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class CloudNotice:
    """One notice standing now. `not_before` (epoch seconds) when the cloud gives a time,
    else `notice_s` after it was first seen."""

    event_id: str
    event_type: str  # one of config.EVENT_TYPES, so events.drain_on applies
    description: str
    not_before: float | None = None
    notice_s: float = 0.0


class NoticeBook:
    def __init__(self, source: str) -> None:
        self.source = source
        self.incarnation = 0
        self._events: dict[str, ScheduledEvent] = {}

    def has(self, event_id: str) -> bool:
        return event_id in self._events

    def document(self, vm_name: str, notices: list[CloudNotice], problems: tuple[str, ...] = (),
                 now: float | None = None) -> EventsDocument:
        now = time.time() if now is None else now
        events: dict[str, ScheduledEvent] = {}
        for notice in notices:
            known = self._events.get(notice.event_id)
            if known is None:
                at = notice.not_before if notice.not_before is not None else now + notice.notice_s
                known = ScheduledEvent(event_id=notice.event_id, event_type=notice.event_type, status="Scheduled",
                                       resources=(vm_name,), not_before=datetime.fromtimestamp(at, timezone.utc),
                                       source=self.source, duration_s=-1, description=notice.description)
            events[notice.event_id] = known
        if events.keys() != self._events.keys() or not self.incarnation:
            self.incarnation += 1
        self._events = events
        return EventsDocument(self.incarnation, tuple(events.values()), problems)


def decode_json(raw: bytes, what: str) -> Any:
    """JSON or ImdsError: too long, not JSON, or nested too deep for the decoder."""
    if len(raw) > MAX_ANSWER_BYTES:
        raise ImdsError(f"{what}: answer of {len(raw)} bytes, more than any notice: refused")
    try:
        return load_json(raw, what)
    except RecursionError:
        raise ImdsError(f"{what}: not valid JSON (nested too deep)") from None


def decode_word(raw: bytes, what: str, allowed: str = r"A-Za-z0-9_:.\-") -> str:
    """A one-word text answer (TRUE, InService, TERMINATE_ON_HOST_MAINTENANCE, m5.large) or ImdsError."""
    text = raw[:MAX_ANSWER_BYTES + 1].decode("utf-8", "replace").strip()
    if not re.fullmatch(rf"[{allowed}]{{1,128}}", text):
        raise ImdsError(f"{what}: expected one word, got {one_line(text)[:80]!r}")
    return text


def parse_utc(text: Any, what: str) -> float:
    """An ISO 8601 time ("2026-12-03T18:02:00Z") as epoch seconds; naive times are UTC."""
    if not isinstance(text, str):
        raise ImdsError(f"{what}: expected an ISO 8601 time, got {type(text).__name__}")
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ImdsError(f"{what}: not an ISO 8601 time: {text[:80]!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
