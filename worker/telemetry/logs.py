"""Logging to stderr, the same in every process: plain lines on a terminal or a
file, sd-daemon priority prefixes when stderr is the journal.

Under systemd, stderr is a journald stream (JOURNAL_STREAM names it). journald
stores a line as info unless it starts with `<N>` (sd-daemon(3)), and it stamps
each entry itself, so there a line is `<4>worker-1[42] worker.queue.consumer: ...`:
`journalctl -p warning` then shows warnings, and no second timestamp.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

# sd-daemon(3) levels: SD_CRIT 2, SD_ERR 3, SD_WARNING 4, SD_INFO 6, SD_DEBUG 7.
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def sd_priority(levelno: int) -> int:
    for threshold, priority in _PRIORITIES:
        if levelno >= threshold:
            return priority
    return 7


def is_journal_stream(stream: TextIO) -> bool:
    """True if `stream` is the journald stream systemd gave this process (or its parent)."""
    device, _, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # closed, or not a real file (pytest capture)
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """Every line of a record (a traceback too) carries the record's priority."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{sd_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def make_formatter(role: str, journal: bool) -> logging.Formatter:
    if journal:
        return JournalFormatter(f"{role}[%(process)d] %(name)s: %(message)s")
    return logging.Formatter(f"%(asctime)s.%(msecs)03d %(levelname)-7s {role}[%(process)d] %(name)s: %(message)s",
                             datefmt="%H:%M:%S")


def setup_logging(level: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(make_formatter(role, is_journal_stream(sys.stderr)))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("azure", "urllib3", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
