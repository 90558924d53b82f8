"""The HTTP Retry-After header (IMDS, Azure Resource Manager, the Retail Prices API)."""

from __future__ import annotations

import email.utils
import math
import time


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait, from delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def honour_retry_after(delay_s: float, retry_after_s: float | None, cap_s: float = math.inf) -> float:
    """The longer of our own backoff delay and the server's Retry-After, the latter cut to `cap_s`
    (a server must not be able to park a caller for hours)."""
    if retry_after_s is None:
        return delay_s
    return max(delay_s, min(retry_after_s, cap_s))
