"""Retiring an idle VM (`[fleet] retire_when_idle_s` > 0): the per-VM half of fleet scale-in.

When every worker has been idle (nothing running, nothing held) for retire_when_idle_s, the queue was
empty all that time (idle workers keep polling it). Then the supervisor stops its workers, puts
`{"kind": "retire", "resource_id", "vm_name", "at"}` on `<queue>-fleet` (off the main loop) and holds:
the fleet keeper deletes this VM unless it is still needed. A VM still alive retire_when_idle_s after
asking resumes work, so a keeper that is down, or that refused, loses nothing.

The Arbiter calls `tick` once per loop turn and skips `manage_workers` while `holding`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from worker.settings import QueueSettings

log = logging.getLogger(__name__)


class Retirement:
    def __init__(self, idle_s: float, queue: QueueSettings, resource_id: str, vm_name: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.idle_s = idle_s
        self.queue = queue
        self.resource_id = resource_id
        self.vm_name = vm_name
        self.clock = clock
        self.idle_since: float | None = None
        self.asked_at: float | None = None

    @property
    def holding(self) -> bool:
        return self.asked_at is not None

    def status(self) -> str:
        assert self.asked_at is not None
        return (f"retiring: idle {self.idle_s:g}s, asked the fleet keeper to delete this VM; "
                f"resuming work in {max(0.0, self.asked_at + self.idle_s - self.clock()):.0f}s if still here")

    def tick(self, workers: Iterable[Any], draining: bool, stop_workers: Callable[[], None]) -> bool:
        """One look per loop turn. Returns True when the hold just ended (the caller's status changes)."""
        now = self.clock()
        if draining:  # an eviction or a stop takes over: start over afterwards
            ended = self.holding
            self.idle_since = self.asked_at = None
            return ended
        if self.asked_at is not None:
            if now - self.asked_at < self.idle_s:
                return False
            log.info("retire: still here %.0fs after asking: resuming work", now - self.asked_at)
            self.asked_at = self.idle_since = None
            return True
        handles = list(workers)
        idle = bool(handles) and all(getattr(w, "ready", False) and not getattr(w, "retiring", False)
                                     and int(w.stats.get("running", 0)) == 0 and int(w.stats.get("held", 0)) == 0
                                     for w in handles)
        if not idle:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = now
            return False
        if now - self.idle_since < self.idle_s:
            return False
        self.asked_at = now
        log.info("retire: queue empty and every worker idle for %.0fs: stopping workers and asking the fleet keeper "
                 "to delete %s", now - self.idle_since, self.vm_name)
        stop_workers()
        threading.Thread(target=self._ask, args=(now,), name="retire-request", daemon=True).start()
        return False

    def _ask(self, at: float) -> None:
        from azure.core.exceptions import AzureError

        from supervisor.fleet.retire import fleet_queue_name, retire_message
        from worker.queue.client import describe, ensure_queue, make_queue_client

        client = make_queue_client(self.queue, fleet_queue_name(self.queue.name))
        try:
            ensure_queue(client)
            client.send_message(retire_message(self.resource_id, self.vm_name, at))
            log.info("retire: asked on %s", fleet_queue_name(self.queue.name))
        except AzureError as exc:  # nothing lost: the VM resumes work after the hold
            log.warning("retire: could not ask on %s: %s", fleet_queue_name(self.queue.name), describe(exc))
        finally:
            client.close()
