"""What to do about a Scheduled Events document: pure, stateful, no I/O."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Union

from supervisor.config import EventsSettings
from supervisor.events.azure import EventsDocument, ScheduledEvent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvictionNotice:
    """An event for this VM that work must stop for."""

    event: ScheduledEvent
    deadline: float  # time.time() epoch seconds: work must have stopped by then
    acknowledge: bool  # POST StartRequests for this event once drained
    not_acknowledged_because: str = ""  # when not acknowledging: why, for the log

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


# Azure only ever counts DocumentIncarnation up. A lower one is a stale answer (e.g. from a load-balanced
# IMDS behind a live migration) and is ignored, unless nothing else is served for this long: then the
# numbering restarted, and an eviction notice must not be missed for the sake of an old counter.
OLDER_INCARNATION_ACCEPTED_AFTER_S = 30.0


class EvictionPolicy:
    def __init__(self, vm_name: str, settings: EventsSettings, acknowledges: bool = True) -> None:
        if not vm_name:
            raise ValueError("vm_name is required to tell this VM's events from its neighbours'")
        self.vm_name = vm_name
        self.settings = settings
        self.acknowledges = acknowledges  # False where the cloud has no acknowledgement (AWS, GCP)
        self._me = vm_name.casefold()
        self._incarnation: int | None = None
        self._older_since: float | None = None  # when documents older than _incarnation began to be served
        self._warned_older = False
        self._draining: dict[str, ScheduledEvent] = {}  # event id → its last listing

    def observe(self, doc: EventsDocument, now: float) -> list[Decision]:
        """Decisions for this document; call it on every successful poll."""
        if self._is_stale(doc, now):
            return []
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
            if event.event_id not in self._draining:
                decisions.append(self._notice(event, now))
            self._draining[event.event_id] = event

        # This process is still running, so the VM was not evicted: whenever an event we drained for
        # leaves the document (cancelled before NotBefore, or never carried out after it), work resumes.
        for event_id in [i for i in self._draining if i not in mine]:
            event = self._draining.pop(event_id)
            if event.status != "Started" and event.not_before is not None and now < event.not_before.timestamp():
                why = "cancelled: the event disappeared before its NotBefore"
            else:
                why = f"the event disappeared ({event.status}) while this VM is still running"
            log.warning("%s %s for this VM: %s", event.event_type, event_id, why)
            decisions.append(NoticeWithdrawn(event_id, why))
        return decisions

    def _is_stale(self, doc: EventsDocument, now: float) -> bool:
        if self._incarnation is None or doc.incarnation >= self._incarnation:
            self._older_since = None
            return False
        if self._older_since is None:
            self._older_since = now
        if now - self._older_since < OLDER_INCARNATION_ACCEPTED_AFTER_S:
            log.log(logging.DEBUG if self._warned_older else logging.WARNING,
                    "ignoring a Scheduled Events document older than the last one seen (DocumentIncarnation %d < %d)",
                    doc.incarnation, self._incarnation)
            self._warned_older = True
            return True
        log.warning("DocumentIncarnation went back from %d to %d and stayed there %.0fs: taking it as restarted numbering",
                    self._incarnation, doc.incarnation, now - self._older_since)
        self._older_since = None
        return False

    def concerns_me(self, event: ScheduledEvent) -> bool:
        return any(r.casefold() == self._me for r in event.resources)

    def should_acknowledge(self, event: ScheduledEvent) -> bool:
        return not self.why_not_acknowledge(event)

    def why_not_acknowledge(self, event: ScheduledEvent) -> str:
        """Empty when this VM may acknowledge the event; otherwise why not."""
        if event.status == "Started":
            return "it has already started"  # under way: approving it again achieves nothing
        if not self.acknowledges:
            return "this cloud has no acknowledgement"
        # An acknowledgement approves the event for every VM it lists.
        if self.settings.ack == "always":
            return ""
        if self.settings.ack == "sole":
            if event.resources and all(r.casefold() == self._me for r in event.resources):
                return ""
            return ("other VMs are listed in it, and acknowledging would approve it for them too "
                    "(events.ack = \"always\" to do it anyway)")
        return "events.ack is \"never\""

    def deadline_for(self, event: ScheduledEvent, now: float) -> float:
        if event.status == "Started" or event.not_before is None:
            return now + self.settings.started_deadline_s
        return max(now, event.not_before.timestamp() - self.settings.safety_margin_s)

    def _notice(self, event: ScheduledEvent, now: float) -> EvictionNotice:
        why_not = self.why_not_acknowledge(event)
        notice = EvictionNotice(event, self.deadline_for(event, now), not why_not, why_not)
        log.warning("%s %s (%s, source %s, NotBefore %s) for this VM: drain, deadline in %.1fs, %s",
                    event.event_type, event.event_id, event.status, event.source or "-",
                    event.not_before.isoformat() if event.not_before else "-", notice.deadline - now,
                    "acknowledge once drained" if notice.acknowledge else f"not acknowledging: {why_not}")
        return notice
