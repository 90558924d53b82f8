"""Settling off the handler's path: a message's final queue call runs while the next handler runs.

A worker process has one Settler: a few daemon threads that run the final
call of finished messages (delete, release, retry-later update, poison move).
At most `max_outstanding` calls are under way at once; `submit` blocks beyond
that, so a slow queue service slows the consumers down instead of piling up
finished messages. Each call still goes through its Lease, under the lease's
lock, so it never races a renewal or a drain on the same pop receipt.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Settler:
    def __init__(self, max_outstanding: int) -> None:
        if max_outstanding < 1:
            raise ValueError(f"max_outstanding must be at least 1, got {max_outstanding}")
        self.max_outstanding = max_outstanding
        self.peak = 0  # most calls ever under way at once
        self._slots = threading.BoundedSemaphore(max_outstanding)
        self._work: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._outstanding = 0
        self._closed = False
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []  # started as needed, up to max_outstanding

    @property
    def outstanding(self) -> int:
        with self._lock:
            return self._outstanding

    def submit(self, call: Callable[[], None]) -> None:
        """Run `call` on a settle thread; waits for a free slot while max_outstanding calls are under way.
        `call` handles its own errors (what is logged and counted depends on the call). After close(), runs
        it on the caller's thread (a handler that outlived its process's exit still settles its message)."""
        if self._closed:
            call()
            return
        self._slots.acquire()
        with self._lock:
            self._outstanding += 1
            self.peak = max(self.peak, self._outstanding)
            if len(self._threads) < self._outstanding:
                thread = threading.Thread(target=self._run, name=f"settle-{len(self._threads)}", daemon=True)
                thread.start()
                self._threads.append(thread)
        self._work.put(call)

    def wait(self, timeout: float) -> bool:
        """Until nothing is under way; False if calls were still under way after `timeout` seconds."""
        with self._idle:
            return self._idle.wait_for(lambda: self._outstanding == 0, timeout)

    def close(self) -> None:
        """Let the threads end once the calls already submitted are done."""
        with self._lock:
            self._closed = True
            for _ in self._threads:
                self._work.put(None)

    def _run(self) -> None:
        while (call := self._work.get()) is not None:
            try:
                call()
            except BaseException:  # a bug in a settle call must not kill the thread or leak its slot
                log.exception("settle call failed unexpectedly")
            finally:
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()
                self._slots.release()
