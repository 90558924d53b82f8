"""What a program run exchanges with the worker besides its exit status:
its output (to the log, line by line, bounded), its checkpoint file and its deadline file.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from worker.common import jsonsafe
from worker.context import Context
from worker.message import MAX_MESSAGE_BYTES, MAX_STATE_DEPTH, CheckpointTooLarge
from worker.queue.client import describe

MAX_LINE_BYTES = 4096  # longer lines are cut; memory per stream stays below this
CUT_MARK = " [line cut]"

log = logging.getLogger("worker.programs.runner")


class OutputLines:
    """Turns one output stream's chunks into log lines; never holds more than MAX_LINE_BYTES."""

    def __init__(self, message_id: str, stream: str, logger: logging.Logger = log, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self.message_id = message_id
        self.stream = stream
        self.logger = logger
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._cutting = False  # the current line was cut: drop the rest of it, up to its newline
        self.lines = 0

    def feed(self, chunk: bytes) -> None:
        start = 0
        while start < len(chunk):
            newline = chunk.find(b"\n", start)
            end = len(chunk) if newline < 0 else newline
            if not self._cutting:
                room = self.max_line_bytes - len(self._partial)
                self._partial += chunk[start:min(end, start + room)]
                if end - start > room:
                    self._emit(cut=True)
                    self._cutting = True
            if newline < 0:
                return
            if self._cutting:
                self._cutting = False
            else:
                self._emit(cut=False)
            start = newline + 1

    def close(self) -> None:
        """End of the stream: a last line without a newline still goes to the log."""
        if self._partial and not self._cutting:
            self._emit(cut=False)
        self._partial.clear()
        self._cutting = False

    def _emit(self, cut: bool) -> None:
        text = bytes(self._partial).decode("utf-8", errors="replace").rstrip("\r")
        self._partial.clear()
        self.lines += 1
        self.logger.info("message %s %s: %s%s", self.message_id, self.stream, text, CUT_MARK if cut else "")


class CheckpointFile:
    """SPOT_CHECKPOINT_FILE of one run: the last checkpoint in, each new valid one stored like ctx.checkpoint."""

    def __init__(self, path: Path, ctx: Context) -> None:
        self.path = path
        self.ctx = ctx
        self._seen: tuple[int, int, int] | None = None
        self._stored: bytes | None = None
        if ctx.state is not None:
            data = json.dumps(ctx.state).encode()
            _write_atomically(path, data)
            self._stored = data
            self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def sync(self) -> None:
        """Store the file's content if it changed since the last look. Errors are logged, never raised."""
        signature = self._signature()
        if signature is None or signature == self._seen:
            return
        self._seen = signature
        if signature[2] > 2 * MAX_MESSAGE_BYTES:  # no use reading it: it cannot fit in the message
            log.error("message %s: checkpoint file is %d bytes, over the queue's %d-byte limit; not stored",
                      self.ctx.message_id, signature[2], MAX_MESSAGE_BYTES)
            return
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            log.warning("message %s: cannot read the checkpoint file (%s); not stored", self.ctx.message_id, exc.strerror)
            self._seen = None
            return
        if data == self._stored:
            return
        try:
            state: Any = jsonsafe.loads(data, max_bytes=2 * MAX_MESSAGE_BYTES, max_depth=MAX_STATE_DEPTH, allow_nan=True)
        except jsonsafe.JsonError as exc:
            log.warning("message %s: checkpoint file is not valid JSON (%s); not stored", self.ctx.message_id, exc)
            return
        try:
            stored = self.ctx.checkpoint(state)
        except CheckpointTooLarge as exc:
            log.error("%s", exc)
            return
        except Exception as exc:  # a queue error: try again at the next look
            log.warning("message %s: storing the checkpoint failed (%s); will try again", self.ctx.message_id, describe(exc))
            self._seen = None
            return
        if stored:
            self._stored = data


def write_deadline_file(path: Path, deadline: float) -> None:
    """SPOT_DEADLINE_FILE: created when a drain starts; one line, the deadline in whole Unix seconds."""
    _write_atomically(path, f"{int(deadline)}\n".encode())


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)
