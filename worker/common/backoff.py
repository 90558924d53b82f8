"""Exponential backoff: the one growth formula, retry loops with full or equal jitter, and the redelivery
delays of failed and interrupted messages."""

from __future__ import annotations

import random
from typing import Literal


def exponential_delay(attempt: int, base_s: float, cap_s: float) -> float:
    """base_s * 2**attempt, at most cap_s (attempt 0 gives base_s). No jitter: callers choose theirs."""
    return min(cap_s, base_s * (2 ** min(max(attempt, 0), 32)))


def retry_delay_s(failures: int, base_s: float, cap_s: float) -> int:
    """A failed message's visibility delay before attempt failures+1: grows with each failure, jittered, whole seconds."""
    delay = exponential_delay(failures - 1, base_s, cap_s)
    return max(1, round(delay * random.uniform(0.8, 1.2)))


INTERRUPTION_DELAY_MAX_S = 30


def interruption_delay_s(releases: int) -> int:
    """Visibility delay after an Interrupted outside a drain: 1, 2, 4 ... 30 s as the message's releases grow."""
    return min(INTERRUPTION_DELAY_MAX_S, 2 ** min(releases, 5))


class Backoff:
    """Delays for a retry loop, growing with each failure up to cap_s; reset() after a success.

    jitter "full": uniform(0, d) (many clients of one service spread out best);
    "equal": uniform(d/2, d) (one waiter that should not retry too early), d = exponential_delay(failures)."""

    def __init__(self, base_s: float = 0.5, cap_s: float = 4.0, rng: random.Random | None = None,
                 jitter: Literal["full", "equal"] = "full") -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.jitter = jitter
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = exponential_delay(self.failures, self.base_s, self.cap_s)
        self.failures += 1
        return self._rng.uniform(0.0 if self.jitter == "full" else ceiling / 2, ceiling)

    def reset(self) -> None:
        self.failures = 0
