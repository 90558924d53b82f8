"""The simulator's model: what IMDS would serve for one VM, and what was asked of it.

Thread-safe (the HTTP server calls it from one thread per connection) and
usable in-process as well as over HTTP.
"""

from __future__ import annotations

import email.utils
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from supervisor.vm.imds import is_json_int

FAULT_MODES = ("500", "410", "429", "slow", "garbage", "reset")
SUBSCRIPTION_ID = "00000000-0000-0000-0000-000000000000"


class BadRequest(Exception):
    """A control request the simulator cannot carry out (answered with 400)."""


@dataclass
class SimulatedEvent:
    event_id: str
    event_type: str
    status: str
    resources: list[str]
    not_before: float | None  # epoch seconds; None once started
    source: str = "Platform"
    duration_s: int = -1
    description: str = ""
    visible_at: float = 0.0
    complete_after_s: float | None = None
    started_at: float | None = None
    raw: dict[str, Any] | None = None  # from /simulate/document: served as is, no clock

    def render(self) -> dict[str, Any]:
        if self.raw is not None:
            return dict(self.raw)
        return {
            "EventId": self.event_id,
            "EventStatus": self.status,
            "EventType": self.event_type,
            "ResourceType": "VirtualMachine",
            "Resources": list(self.resources),
            "NotBefore": "" if self.not_before is None else email.utils.formatdate(self.not_before, usegmt=True),
            "Description": self.description,
            "EventSource": self.source,
            "DurationInSeconds": self.duration_s,
        }

    def start(self, now: float) -> None:
        self.status = "Started"
        self.not_before = None
        self.started_at = now
        if self.raw is not None:
            self.raw = {**self.raw, "EventStatus": "Started", "NotBefore": ""}


@dataclass
class Fault:
    """How the next `count` GETs of Scheduled Events misbehave."""

    mode: str = ""
    count: int = 0
    delay_s: float = 0.0
    retry_after_s: float | None = None


@dataclass
class _Document:
    incarnation: int = 1
    events: list[SimulatedEvent] = field(default_factory=list)
    opaque: Any = None  # a /simulate/document that is not a well-formed document
    verbatim_events: list[str] = field(default_factory=list)  # /simulate/verbatim-event: spliced in as given
    snapshot: list[dict[str, Any]] = field(default_factory=list)
    acks: list[dict[str, Any]] = field(default_factory=list)
    fault: Fault = field(default_factory=Fault)
    requests: Counter[str] = field(default_factory=Counter)


class ImdsState:
    def __init__(self, *, vm_name: str = "vm-spot-07", vm_size: str = "Standard_D2s_v3", priority: str = "Spot",
                 eviction_policy: str | None = None, location: str = "eastus2", resource_group: str = "rg-vmspot",
                 vm_scale_set_name: str = "", notice_s: float = 30.0,
                 on_ack: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_ack = on_ack  # called in the request's thread before the ack is answered
        self.vm_name = vm_name
        self.vm_size = vm_size
        self.priority = priority
        self.eviction_policy = eviction_policy if eviction_policy is not None else (
            "Deallocate" if priority.lower() == "spot" else "")
        self.location = location
        self.resource_group = resource_group
        self.vm_scale_set_name = vm_scale_set_name
        self.notice_s = notice_s
        self.vm_id = str(uuid.uuid4())
        self._lock = threading.Lock()
        self._doc = _Document()

    def instance_document(self) -> dict[str, Any]:
        resource_id = (f"/subscriptions/{SUBSCRIPTION_ID}/resourceGroups/{self.resource_group}"
                       f"/providers/Microsoft.Compute/virtualMachines/{self.vm_name}")
        return {
            "compute": {
                "azEnvironment": "AzurePublicCloud",
                "evictionPolicy": self.eviction_policy,
                "location": self.location,
                "name": self.vm_name,
                "osType": "Linux",
                "priority": self.priority,
                "provider": "Microsoft.Compute",
                "resourceGroupName": self.resource_group,
                "resourceId": resource_id,
                "subscriptionId": SUBSCRIPTION_ID,
                "tags": "",
                "vmId": self.vm_id,
                "vmScaleSetName": self.vm_scale_set_name,
                "vmSize": self.vm_size,
                "zone": "",
            },
            "network": {"interface": []},
        }

    def events_document(self) -> Any:
        with self._lock:
            self._advance(time.time())
            if self._doc.opaque is not None:
                return self._doc.opaque
            return {"DocumentIncarnation": self._doc.incarnation, "Events": list(self._doc.snapshot)}

    def add_event(self, event_type: str, *, delay_s: float | None = None, resources: list[str] | None = None,
                  status: str = "Scheduled", source: str = "Platform", duration_s: int = -1,
                  description: str = "", complete_after_s: float | None = None, after_s: float = 0.0,
                  event_id: str | None = None) -> dict[str, Any]:
        """Schedule an event; it shows up after `after_s`, with NotBefore `delay_s` later."""
        now = time.time()
        visible_at = now + after_s
        delay = self.notice_s if delay_s is None else delay_s
        event = SimulatedEvent(
            event_id=event_id or str(uuid.uuid4()).upper(),
            event_type=event_type,
            status=status,
            resources=list(resources) if resources is not None else [self.vm_name],
            not_before=None if status == "Started" else visible_at + delay,
            source=source,
            duration_s=duration_s,
            description=description,
            visible_at=visible_at,
            complete_after_s=complete_after_s,
            started_at=visible_at if status == "Started" else None,
        )
        with self._lock:
            self._drop_opaque()
            self._doc.events.append(event)
            self._advance(now)
            rendered = event.render()
            return {"EventId": event.event_id, "EventType": event_type, "NotBefore": rendered["NotBefore"],
                    "Resources": event.resources, "VisibleAt": visible_at,
                    "DocumentIncarnation": self._doc.incarnation}

    def simulate_eviction(self, delay_s: float | None = None, resources: list[str] | None = None,
                          complete_after_s: float | None = None, after_s: float = 0.0) -> dict[str, Any]:
        return self.add_event("Preempt", delay_s=delay_s, resources=resources,
                              complete_after_s=complete_after_s, after_s=after_s)

    def cancel_event(self, event_id: str) -> dict[str, Any] | None:
        with self._lock:
            self._advance(time.time())
            for event in self._doc.events:
                if event.event_id == event_id:
                    self._doc.events.remove(event)
                    self._commit()
                    return {"EventId": event_id, "DocumentIncarnation": self._doc.incarnation}
        return None

    def events_document_text(self) -> bytes:
        """The Scheduled Events document as served: events_document() with any verbatim events spliced
        into Events as their exact text (hostile ones no JSON library would write or read back)."""
        document = self.events_document()
        with self._lock:
            verbatim = list(self._doc.verbatim_events)
        if not verbatim or not isinstance(document, dict) or not isinstance(document.get("Events"), list):
            return json.dumps(document).encode()
        events = [json.dumps(e) for e in document["Events"]] + verbatim
        head = json.dumps({k: v for k, v in document.items() if k != "Events"})[:-1]
        return f'{head}{", " if len(head) > 1 else ""}"Events": [{", ".join(events)}]}}'.encode()

    def add_verbatim_event(self, text: str) -> dict[str, Any]:
        """Serve `text` as one more item of Events, exactly as given (never parsed here)."""
        with self._lock:
            self._doc.verbatim_events.append(text)
            self._doc.incarnation += 1
            return {"DocumentIncarnation": self._doc.incarnation, "verbatim_events": len(self._doc.verbatim_events)}

    def set_document(self, document: Any) -> dict[str, Any]:
        """Serve `document` as given; a well-formed one still reacts to acks and cancels."""
        with self._lock:
            doc = self._doc
            if (isinstance(document, dict) and is_json_int(document.get("DocumentIncarnation"))
                    and isinstance(document.get("Events"), list)
                    and all(isinstance(e, dict) and isinstance(e.get("EventId"), str) for e in document["Events"])):
                doc.opaque = None
                doc.events = [SimulatedEvent(e["EventId"], str(e.get("EventType")), str(e.get("EventStatus")), [],
                                             None, raw=dict(e)) for e in document["Events"]]
                doc.incarnation = document["DocumentIncarnation"]
                doc.snapshot = [e.render() for e in doc.events]
            else:
                doc.opaque = document
                doc.events = []
                doc.snapshot = []
            return {"DocumentIncarnation": doc.incarnation, "Events": [e.event_id for e in doc.events],
                    "verbatim": doc.opaque is not None}

    def set_faults(self, mode: str, count: int = 1, delay_s: float | None = None,
                   retry_after_s: float | None = None) -> dict[str, Any]:
        if mode not in FAULT_MODES:
            raise BadRequest(f"mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
        if not is_json_int(count) or count < 0:
            raise BadRequest(f"count must be a whole number >= 0, got {count!r}")
        delay = (2.0 if mode == "slow" else 0.0) if delay_s is None else float(delay_s)
        with self._lock:
            self._doc.fault = Fault(mode, count, delay, retry_after_s)
        return {"mode": mode, "count": count, "delay_s": delay, "retry_after_s": retry_after_s}

    def take_fault(self) -> Fault | None:
        """The fault the next Scheduled Events GET suffers, if any (counts it down)."""
        with self._lock:
            fault = self._doc.fault
            if fault.count <= 0:
                return None
            fault.count -= 1
            return Fault(fault.mode, 1, fault.delay_s, fault.retry_after_s)

    def acknowledge(self, body: Any, raw: str, headers: dict[str, str]) -> list[str]:
        """Record a StartRequests POST and start the events it names; returns their ids."""
        now = time.time()
        record = {"time": now, "body": body, "raw": raw, "headers": headers}
        if self.on_ack is not None:
            self.on_ack(record)
        with self._lock:
            self._doc.acks.append(record)
            self._advance(now)
            requested = {r["EventId"] for r in body["StartRequests"]}
            started = []
            for event in self._doc.events:
                if event.event_id in requested and event.status != "Started":
                    event.start(now)
                    started.append(event.event_id)
            self._commit()
            return started

    def acks(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(a) for a in self._doc.acks]

    def count_request(self, endpoint: str) -> None:
        with self._lock:
            self._doc.requests[endpoint] += 1

    def request_counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._doc.requests)

    def reset(self) -> dict[str, Any]:
        with self._lock:
            old = self._doc
            self._doc = _Document(incarnation=old.incarnation + (old.opaque is not None), snapshot=old.snapshot)
            self._commit()
            return {"DocumentIncarnation": self._doc.incarnation}

    # -- with the lock held ----------------------------------------------------

    def _advance(self, now: float) -> None:
        """Let the clock act on managed events: start them, complete them."""
        kept = []
        for event in self._doc.events:
            if event.raw is None:
                if event.status != "Started" and event.not_before is not None and now >= event.not_before:
                    event.start(event.not_before)
                if (event.complete_after_s is not None and event.started_at is not None
                        and now >= event.started_at + event.complete_after_s):
                    continue
            kept.append(event)
        self._doc.events = kept
        self._commit()

    def _commit(self) -> None:
        """Bump DocumentIncarnation whenever the Events array as served changed."""
        if self._doc.opaque is not None:
            return
        now = time.time()
        rendered = [e.render() for e in self._doc.events if e.raw is not None or e.visible_at <= now]
        if rendered != self._doc.snapshot:
            self._doc.snapshot = rendered
            self._doc.incarnation += 1

    def _drop_opaque(self) -> None:
        if self._doc.opaque is not None:
            self._doc.opaque = None
            self._doc.snapshot = []
            self._doc.incarnation += 1
