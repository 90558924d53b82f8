"""What to do about a Scheduled Events document: pure, stateful, no I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

from supervisor.config import EventsSettings
from supervisor.scheduled_events import EventsDocument, ScheduledEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionNotice:
    """An event for this VM that work must stop for."""

    event: ScheduledEvent
    deadline: float  # time.time() epoch seconds: work must have stopped by then
    acknowledge: bool  # POST StartRequests for this event once drained

    @property
    def event_id(self) -> str:
        return self.event.event_id


@dataclass(frozen=True)
class NoticeWithdrawn:
    """An event we drained for was cancelled: work may resume."""

    event_id: str
    reason: str


@dataclass(frozen=True)
class Acknowledged:
    """How an acknowledgement (POST StartRequests) ended: error is None on success."""

    event_id: str
    error: str | None


Decision = Union[EvictionNotice, NoticeWithdrawn, Acknowledged]


@dataclass
class _Draining:
    event: ScheduledEvent
    not_before: float | None  # last known NotBefore; None once seen Started
    started: bool


class EvictionPolicy:
    def __init__(self, vm_name: str, settings: EventsSettings) -> None:
        if not vm_name:
            raise ValueError("vm_name is required to tell this VM's events from its neighbours'")
        self.vm_name = vm_name
        self.settings = settings
        self._me = vm_name.casefold()
        self._incarnation: int | None = None
        self._draining: dict[str, _Draining] = {}
        self._finished: set[str] = set()

    def observe(self, doc: EventsDocument, now: float) -> list[Decision]:
        """Decisions for this document; call it on every successful poll."""
        changed = doc.incarnation != self._incarnation
        self._incarnation = doc.incarnation
        decisions: list[Decision] = []
        mine: dict[str, ScheduledEvent] = {}
        for event in doc.events:
            if not self.concerns_me(event):
                if changed:
                    log.info("ignoring %s %s for %s (%s): not this VM (%s)", event.event_type, event.event_id,
                             ",".join(event.resources), event.status, self.vm_name)
                continue
            mine[event.event_id] = event
            if event.event_type not in self.settings.drain_on:
                if changed:
                    log.info("%s %s for this VM (%s, NotBefore %s, %ss): not in drain_on, no action",
                             event.event_type, event.event_id, event.status,
                             event.not_before.isoformat() if event.not_before else "-", event.duration_s)
                continue
            tracked = self._draining.get(event.event_id)
            if tracked is not None:
                self._update(tracked, event)
            elif event.event_id not in self._finished:
                decisions.append(self._notice(event, now))

        for event_id in [i for i in self._draining if i not in mine]:
            tracked = self._draining.pop(event_id)
            if not tracked.started and tracked.not_before is not None and now < tracked.not_before:
                log.warning("%s %s disappeared before its NotBefore: cancelled, resuming",
                            tracked.event.event_type, event_id)
                decisions.append(NoticeWithdrawn(event_id, "cancelled: the event disappeared before its NotBefore"))
            else:
                log.info("%s %s is no longer listed (completed)", tracked.event.event_type, event_id)
                self._finished.add(event_id)
        return decisions

    def concerns_me(self, event: ScheduledEvent) -> bool:
        return any(r.casefold() == self._me for r in event.resources)

    def should_acknowledge(self, event: ScheduledEvent) -> bool:
        # An acknowledgement approves the event for every VM it lists.
        if self.settings.ack == "always":
            return True
        if self.settings.ack == "sole":
            return bool(event.resources) and all(r.casefold() == self._me for r in event.resources)
        return False

    def deadline_for(self, event: ScheduledEvent, now: float) -> float:
        if event.status == "Started" or event.not_before is None:
            return now + self.settings.started_deadline_s
        return max(now, event.not_before.timestamp() - self.settings.safety_margin_s)

    def _notice(self, event: ScheduledEvent, now: float) -> EvictionNotice:
        not_before = None if event.status == "Started" or event.not_before is None else event.not_before.timestamp()
        self._draining[event.event_id] = _Draining(event, not_before, started=not_before is None)
        # A Started event is already under way: approving it again achieves nothing.
        notice = EvictionNotice(event, self.deadline_for(event, now), self.should_acknowledge(event) and event.status != "Started")
        log.warning("%s %s (%s, source %s, NotBefore %s) for this VM: drain, deadline in %.1fs, acknowledge=%s",
                    event.event_type, event.event_id, event.status, event.source or "-",
                    event.not_before.isoformat() if event.not_before else "-", notice.deadline - now,
                    notice.acknowledge)
        return notice

    @staticmethod
    def _update(tracked: _Draining, event: ScheduledEvent) -> None:
        tracked.event = event
        if event.status == "Started" or event.not_before is None:
            tracked.started = True
            tracked.not_before = None
        else:
            tracked.not_before = event.not_before.timestamp()
