"""What a program run exchanges with the worker besides its exit status:
its output (to the log, line by line, bounded), its checkpoint file and its deadline file.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from worker.common import jsonsafe
from worker.context import Context
from worker.message import MAX_MESSAGE_BYTES, MAX_STATE_DEPTH, CheckpointTooLarge
from worker.queue.client import describe

MAX_LINE_BYTES = 4096  # longer lines are cut; memory per stream stays below this
CUT_MARK = " [line cut]"
MAX_CHECKPOINT_FILE_BYTES = 2 * MAX_MESSAGE_BYTES  # more cannot fit in the message, whatever its encoding
# Control characters from program output never reach the log raw (terminal escapes, carriage returns,
# line separators that split one record in two): shown escaped. Tabs stay.
_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029"})

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
        text = bytes(self._partial).decode("utf-8", errors="replace").rstrip("\r").translate(_ESCAPES)
        self._partial.clear()
        self.lines += 1
        self.logger.info("message %s %s: %s%s", self.message_id, self.stream, text, CUT_MARK if cut else "")


class CheckpointFile:
    """SPOT_CHECKPOINT_FILE of one run: the last checkpoint in, each new valid one stored like ctx.checkpoint.
    The program owns the file: it may replace it with anything (a FIFO, a symlink to /dev/zero, a huge
    file), so it is read only when it is a regular file, bounded, and never blocking."""

    def __init__(self, path: Path, ctx: Context) -> None:
        self.path = path
        self.ctx = ctx
        self._seen: tuple[int, int, int, int] | None = None
        self._stored: bytes | None = None
        if ctx.state is not None:
            data = json.dumps(ctx.state).encode()
            _write_atomically(path, data)
            self._stored = data
            self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.lstat(self.path)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size, st.st_mode

    def sync(self) -> None:
        """Store the file's content if it changed since the last look. Errors are logged (once per
        change of the file), never raised."""
        signature = self._signature()
        if signature is None or signature == self._seen:
            return
        self._seen = signature
        message_id = self.ctx.message_id
        try:
            data = read_regular_file(self.path, MAX_CHECKPOINT_FILE_BYTES)
        except NotRegularFile as exc:
            log.error("message %s: checkpoint file is %s, not a regular file; not stored", message_id, exc)
            return
        except OSError as exc:
            log.warning("message %s: cannot read the checkpoint file (%s); not stored", message_id, exc.strerror)
            self._seen = None
            return
        if data is None:  # no use reading it all: it cannot fit in the message
            log.error("message %s: checkpoint file is over %d bytes, beyond the queue's %d-byte limit; not stored",
                      message_id, MAX_CHECKPOINT_FILE_BYTES, MAX_MESSAGE_BYTES)
            return
        if data == self._stored:
            return
        try:
            state: Any = jsonsafe.loads(data, max_bytes=2 * MAX_MESSAGE_BYTES, max_depth=MAX_STATE_DEPTH, allow_nan=True)
        except jsonsafe.JsonError as exc:
            log.warning("message %s: checkpoint file is not valid JSON (%s); not stored", message_id, exc)
            return
        try:
            stored = self.ctx.checkpoint(state)
        except CheckpointTooLarge as exc:
            log.error("%s", exc)
            return
        except Exception as exc:  # a queue error: try again at the next look
            log.warning("message %s: storing the checkpoint failed (%s); will try again", message_id, describe(exc))
            self._seen = None
            return
        if stored:
            self._stored = data


class NotRegularFile(Exception):
    """str(): what the file is instead ("a FIFO", "a symbolic link", ...)."""


def read_regular_file(path: Path, limit: int) -> bytes | None:
    """The content of `path` if it is a regular file of at most `limit` bytes; None if it is larger.
    Never follows a symlink, never blocks (a FIFO is refused, not read), never reads more than limit + 1 bytes."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRegularFile("a symbolic link") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(_kind(mode))
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return None if size > limit else b"".join(chunks)
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def write_deadline_file(path: Path, deadline: float, message_id: str) -> None:
    """SPOT_DEADLINE_FILE: created when a drain starts; one line, the deadline in whole Unix seconds.
    Never raises: a run directory the program removed is made again; any other error is logged."""
    data = f"{int(deadline)}\n".encode()
    try:
        try:
            _write_atomically(path, data)
        except FileNotFoundError:
            os.mkdir(path.parent, 0o700)
            _write_atomically(path, data)
    except OSError as exc:
        log.warning("message %s: cannot write the deadline file (%s)", message_id, exc.strerror)


def _write_atomically(path: Path, data: bytes) -> None:
    """A fresh temporary file (O_EXCL: never a symlink or FIFO the program left there), then renamed over `path`."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
