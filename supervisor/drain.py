"""The supervisor's drain: what it is draining for, how far it got, and what follows it.

Pure state and decisions, no I/O: the arbiter acts on them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from supervisor.eviction import EvictionNotice

ACK_ATTEMPTS = 3


class DrainPhase(enum.Enum):
    DRAINING = "draining"  # workers told to stop receiving and finish by the deadline
    ABANDONED = "abandoned"  # deadline passed: workers told to give back everything and exit
    KILLED = "killed"  # kill grace passed too: the workers left were SIGKILLed
    HOLDING = "holding"  # no workers left; waiting for the event to start or disappear


class Outcome(enum.Enum):
    """What follows once no worker is left (and acknowledgement, if any, has ended)."""

    EXIT = "exit"
    RESUME = "resume"
    HOLD = "hold"


@dataclass
class DrainInProgress:
    reason: str
    deadline: float
    started_at: float
    notice: EvictionNotice | None = None  # the Scheduled Event drained for; None for a stop
    stop_requested: bool = False  # a signal asked for a stop: never resume, never hold
    phase: DrainPhase = DrainPhase.DRAINING
    waiting_for: set[int] = field(default_factory=set)  # pids not yet reported "stopped receiving"
    stopped_receiving_at: float | None = None  # when the last worker stopped receiving
    drained_at: float | None = None  # when the last worker exited
    acknowledged_at: float | None = None
    ack_attempts: int = 0
    ack_in_flight: bool = False
    next_ack_at: float = 0.0

    def worker_stopped_receiving(self, pid: int, at: float | None) -> bool:
        """A worker's report (at set) or exit (at None); True once the last worker is in."""
        if pid not in self.waiting_for:
            return False
        self.waiting_for.discard(pid)
        if at is not None:
            self.stopped_receiving_at = max(self.stopped_receiving_at or at, at)
        return not self.waiting_for and self.stopped_receiving_at is not None

    def needs_ack(self, can_acknowledge: bool) -> bool:
        """The notice asks for an acknowledgement that has neither succeeded nor run out of attempts."""
        return (can_acknowledge and self.notice is not None and self.notice.acknowledge
                and self.acknowledged_at is None and self.ack_attempts < ACK_ATTEMPTS)

    def ack_failed(self, now: float) -> None:
        self.ack_in_flight = False
        self.ack_attempts += 1
        self.next_ack_at = now + 0.2 * self.ack_attempts

    def outcome(self) -> Outcome:
        notice = self.notice
        if notice is None:
            return Outcome.EXIT
        if notice.event.event_type == "Freeze":
            # A freeze pauses the VM and lets it carry on: nothing will restart this service.
            return Outcome.RESUME
        if self.acknowledged_at is None and not self.stop_requested and notice.event.status != "Started":
            # Not approved by us, so it may still be cancelled: stay (without workers) to resume if it is.
            return Outcome.HOLD
        return Outcome.EXIT

    def timeline(self) -> str:
        """One JSON object with the drain's moments (epoch seconds), for tools such as bench/eviction_timing.py."""
        record: dict[str, Any] = {"reason": self.reason, "started_at": self.started_at,
                                  "stopped_receiving_at": self.stopped_receiving_at, "drained_at": self.drained_at,
                                  "acknowledged_at": self.acknowledged_at, "deadline": self.deadline}
        return json.dumps(record, separators=(",", ":"))


def why_not_acknowledged(notice: EvictionNotice) -> str:
    event = notice.event
    if event.status == "Started":
        return "it has already started"
    if len(event.resources) > 1:
        return "other VMs are listed in it, and acknowledging would approve it for them too (events.ack = \"always\" to do it anyway)"
    return "events.ack is \"never\""
