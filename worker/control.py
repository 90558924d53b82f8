"""The control channel between the supervisor and one worker: JSON lines over a socketpair.

Every message is an object with a "kind" (one of `Kind`) and the fields listed there.
Worker messages also carry "pid".
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

from worker.common import jsonsafe

log = logging.getLogger(__name__)

MAX_LINE_BYTES = 1024 * 1024  # a real message is under 1 KB
MAX_LINE_DEPTH = 8


class Kind:
    """The message kinds, in one place."""

    # supervisor → worker
    DRAIN = "drain"  # "deadline": epoch s. Stop receiving, give back unstarted messages, finish by then.
    ABANDON = "abandon"  # the deadline passed: give back everything still held and exit
    # worker → supervisor
    READY = "ready"  # "threads": consumers running
    STATS = "stats"  # counts, every STATS_INTERVAL_S (also the worker's heartbeat)
    STOPPED_RECEIVING = "stopped_receiving"  # "at": epoch s when the last receive was refused
    EXITING = "exiting"  # final counts, "abandoned": whether the deadline cut handlers short
    FATAL = "fatal"  # "code": exit code, "error": one line. The worker cannot start.


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self._buffer = b""
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, kind: str, **fields: Any) -> bool:
        """Best effort: False when the other side is gone."""
        if self.closed:
            return False
        data = json.dumps({"kind": kind, **fields}, separators=(",", ":")).encode() + b"\n"
        try:
            self.sock.setblocking(True)
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False
        finally:
            if not self.closed:
                self.sock.setblocking(False)

    def receive(self) -> list[dict[str, Any]]:
        """Every complete message available now; sets `closed` on EOF."""
        while not self.closed:
            try:
                chunk = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.closed = True
                break
            if not chunk:
                self.closed = True
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > MAX_LINE_BYTES:  # a line with no end in sight: dropped, not held
            log.warning("control channel: dropping %d bytes without a line end", len(self._buffer))
            self._buffer = b""
        messages = []
        for line in lines:
            try:
                message = jsonsafe.loads(line, max_bytes=MAX_LINE_BYTES, max_depth=MAX_LINE_DEPTH)
            except jsonsafe.JsonError as exc:
                log.warning("control channel: ignoring a malformed line (%s): %r", exc, line[:80])
                continue
            if isinstance(message, dict) and isinstance(message.get("kind"), str):
                messages.append(message)
        return messages

    def close(self) -> None:
        self.closed = True
        self.sock.close()
