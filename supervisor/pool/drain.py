"""The supervisor's drain: what it is draining for, how far it got, and what follows it.

Pure state and decisions, no I/O: the arbiter acts on them.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any

from supervisor.events.eviction import EvictionNotice

# Before deciding what follows a drain, wait for this many acknowledgement attempts (a quick ack is
# what lets the platform go ahead early). While holding, a failed one is retried, the delay growing to the cap.
ACK_ATTEMPTS_BEFORE_DECIDING = 3
ACK_RETRY_FIRST_S = 0.2
ACK_RETRY_MAX_S = 30.0

# How final an event is for this process: the most final one drained for decides what follows.
FINALITY = {"Freeze": 1, "Reboot": 2, "Redeploy": 2, "Preempt": 3, "Terminate": 3}


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
class PendingAck:
    """The acknowledgement of one event this VM may approve."""

    attempts: int = 0  # failed so far
    in_flight: bool = False
    next_at: float = 0.0
    done_at: float | None = None

    def sent(self) -> None:
        self.in_flight = True

    def succeeded(self, now: float) -> None:
        self.in_flight = False
        self.done_at = now

    def failed(self, now: float) -> None:
        self.in_flight = False
        self.attempts += 1
        self.next_at = now + min(ACK_RETRY_MAX_S, ACK_RETRY_FIRST_S * 2 ** (self.attempts - 1))


@dataclass
class DrainInProgress:
    reason: str
    deadline: float  # the earliest of every notice's and stop's deadline
    started_at: float
    notices: dict[str, EvictionNotice] = field(default_factory=dict)  # every event drained for, by id
    stop_requested: bool = False  # a signal (or a failure) asked for a stop: it always ends in exit
    exit_code: int = 0  # the service's exit code when the drain ends in exit
    phase: DrainPhase = DrainPhase.DRAINING
    waiting_for: set[int] = field(default_factory=set)  # pids not yet reported "stopped receiving"
    stopped_receiving_at: float | None = None  # when the last worker stopped receiving
    drained_at: float | None = None  # when the last worker exited
    acks: dict[str, PendingAck] = field(default_factory=dict)  # by event id: the notices this VM may approve

    def add_notice(self, notice: EvictionNotice) -> None:
        self.notices[notice.event_id] = notice
        if notice.acknowledge:
            self.acks.setdefault(notice.event_id, PendingAck())

    def withdraw(self, event_id: str) -> bool:
        """Forget a notice whose event disappeared; False if it was not one of ours."""
        self.acks.pop(event_id, None)
        return self.notices.pop(event_id, None) is not None

    def worker_stopped_receiving(self, pid: int, at: float | None) -> bool:
        """A worker's report (at set) or exit (at None); True once the last worker is in."""
        if pid not in self.waiting_for:
            return False
        self.waiting_for.discard(pid)
        if at is not None:
            self.stopped_receiving_at = max(self.stopped_receiving_at or at, at)
        return not self.waiting_for and self.stopped_receiving_at is not None

    def acks_due(self, now: float) -> list[str]:
        return [event_id for event_id, ack in self.acks.items()
                if ack.done_at is None and not ack.in_flight and now >= ack.next_at]

    def waiting_for_acks(self) -> bool:
        """An acknowledgement is under way or still has early attempts left: decide after it."""
        return any(ack.done_at is None and (ack.in_flight or ack.attempts < ACK_ATTEMPTS_BEFORE_DECIDING)
                   for ack in self.acks.values())

    @property
    def acknowledged_at(self) -> float | None:
        """When the last acknowledgement succeeded, once every one has."""
        times = [ack.done_at for ack in self.acks.values()]
        return max(t for t in times if t is not None) if times and None not in times else None

    def final_notice(self) -> EvictionNotice | None:
        """The most final event drained for (ties: the earliest deadline)."""
        return max(self.notices.values(), default=None,
                   key=lambda n: (FINALITY.get(n.event.event_type, max(FINALITY.values())), -n.deadline))

    def outcome(self) -> Outcome:
        if self.stop_requested:
            return Outcome.EXIT
        final = self.final_notice()
        if final is None or final.event.event_type == "Freeze":
            # Every event withdrawn, or only freezes: a freeze pauses the VM and lets it carry on,
            # and nothing would restart this service after it.
            return Outcome.RESUME
        # The VM is going (acknowledged or not) or the event may still be cancelled: stay, without workers,
        # until the VM goes, and resume if the event disappears while this process still runs.
        return Outcome.HOLD

    def holding_status(self) -> str:
        final = self.final_notice()
        assert final is not None
        acked = self.acks.get(final.event_id)
        if acked is not None and acked.done_at is not None:
            why = "acknowledged, waiting for the VM to go"
        elif acked is not None:
            why = f"acknowledgement failed {acked.attempts} time(s), retrying"
        else:
            why = "not ours to acknowledge, it may still be cancelled"
        return f"drained, holding for {final.event.event_type} {final.event_id} ({why})"

    def timeline(self) -> str:
        """One JSON object with the drain's moments (epoch seconds), for tools such as bench/eviction_timing.py."""
        record: dict[str, Any] = {"reason": self.reason, "started_at": self.started_at,
                                  "stopped_receiving_at": self.stopped_receiving_at, "drained_at": self.drained_at,
                                  "acknowledged_at": self.acknowledged_at, "deadline": self.deadline,
                                  "events": sorted(self.notices)}
        return json.dumps(record, separators=(",", ":"))

