"""The systemd notify protocol (sd_notify(3)) without a dependency.

Every function is a no-op returning False when not run under systemd
`Type=notify` (no NOTIFY_SOCKET), and never raises.
"""

from __future__ import annotations

import logging
import os
import socket

from worker.common.text import one_line  # a newline would end the STATUS= field and start a bogus one

log = logging.getLogger(__name__)


def notify(*lines: str) -> bool:
    """Send `lines` (e.g. "READY=1", "STATUS=...") as one datagram. True if sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    payload = "\n".join(lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in a path address
        log.debug("sd_notify to %r failed: %s", os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The systemd watchdog interval in seconds, or None if no watchdog is meant for us.

    Ping at half this interval.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


def ready(status: str | None = None) -> bool:
    return notify("READY=1", f"STATUS={one_line(status)}") if status else notify("READY=1")


def status(text: str) -> bool:
    return notify(f"STATUS={one_line(text)}")


def stopping(status: str | None = None) -> bool:
    return notify("STOPPING=1", f"STATUS={one_line(status)}") if status else notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")
