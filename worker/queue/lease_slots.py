"""Held messages shared with the supervisor, so a handler holding the GIL cannot cost a message its lease.

A worker's lease keeper is a thread: a handler that holds the GIL (a C extension,
a catastrophic regex) stops it with every other thread of the process. So each
held message's id, pop receipt and last renewal also live in a table in shared
memory (a memfd the supervisor creates before it forks the worker); the
supervisor's lease guard renews any lease the worker let go stale, and gives back
what a worker held when it was killed.

Whoever calls the queue with a message's pop receipt holds that slot's POSIX
record lock (fcntl): the worker and the supervisor never race on a receipt
(every update invalidates the previous one), and the kernel drops a dead
process's locks. Threads of one process share their process's locks; within the
worker, the Lease's own lock serialises them.

Each slot also keeps the queue text that records one more release (the sealed
envelope), so a message given back by the supervisor for a worker cut short at a
drain deadline is not counted as a failure.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.message import MAX_MESSAGE_BYTES

_HEADER = struct.Struct("<BB2xid2HI")  # held, has_text, visibility_timeout_s, renewed_at, id len, receipt len, text len
_ID_MAX = 128
_RECEIPT_MAX = 512
_ID_AT = _HEADER.size
_RECEIPT_AT = _ID_AT + _ID_MAX
_TEXT_AT = _RECEIPT_AT + _RECEIPT_MAX
SLOT_BYTES = _TEXT_AT + MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class HeldMessage:
    """A slot's content, as the supervisor reads it."""

    index: int
    message_id: str
    pop_receipt: str
    renewed_at: float  # time.monotonic(): CLOCK_MONOTONIC, the same in every process
    visibility_timeout_s: int
    release_text: str | None


class LeaseSlots:
    """A fixed number of slots in a memfd, mapped before fork so the worker and the supervisor share it.

    Pages are only backed once written, so the 64 KiB of text room per slot costs what is used.
    """

    def __init__(self, slots: int) -> None:
        self.slots = max(1, slots)
        self.fd = os.memfd_create("spot-leases", os.MFD_CLOEXEC) if hasattr(os, "memfd_create") else _unlinked_file()
        os.ftruncate(self.fd, self.slots * SLOT_BYTES)
        self.map = mmap.mmap(self.fd, self.slots * SLOT_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._claim_lock = threading.Lock()  # within one process: which slots this process handed out
        self._claimed: set[int] = set()

    # -- the lock of one slot (a 1-byte POSIX record lock at its start)

    @contextmanager
    def locked(self, index: int) -> Iterator[None]:
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, index * SLOT_BYTES, os.SEEK_SET)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, index * SLOT_BYTES, os.SEEK_SET)

    def try_lock(self, index: int) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, index * SLOT_BYTES, os.SEEK_SET)
        except OSError:  # the other process is calling the queue for this message right now
            return False
        return True

    def unlock(self, index: int) -> None:
        fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, index * SLOT_BYTES, os.SEEK_SET)

    # -- the worker's side

    def free_count(self) -> int:
        """Slots this process has not handed out (the worker receives no more than this)."""
        with self._claim_lock:
            return self.slots - len(self._claimed)

    def claim(self, message_id: str, pop_receipt: str, visibility_timeout_s: int, release_text: str | None) -> int | None:
        """A slot for a newly received message, or None when every slot is taken or the id or receipt does
        not fit (the caller must then not hold the message: nothing could renew it for a stuck worker)."""
        raw_id, raw_receipt = message_id.encode(), pop_receipt.encode()
        if len(raw_id) > _ID_MAX or len(raw_receipt) > _RECEIPT_MAX:
            return None
        with self._claim_lock:
            free = next((i for i in range(self.slots) if i not in self._claimed), None)
            if free is None:
                return None
            self._claimed.add(free)
        with self.locked(free):
            at = free * SLOT_BYTES
            self.map[at + _ID_AT:at + _ID_AT + len(raw_id)] = raw_id
            self._write_receipt(free, pop_receipt, time.monotonic(), visibility_timeout_s, len(raw_id))
            self.set_release_text(free, release_text)
        return free

    def set_release_text(self, index: int, text: str | None) -> None:
        """Caller holds the slot's lock (or owns it alone)."""
        at = index * SLOT_BYTES
        raw = text.encode() if text is not None else b""
        has_text = text is not None and len(raw) <= MAX_MESSAGE_BYTES
        if has_text:
            self.map[at + _TEXT_AT:at + _TEXT_AT + len(raw)] = raw
        held, _, visibility, renewed_at, id_len, receipt_len, _ = _HEADER.unpack_from(self.map, at)
        _HEADER.pack_into(self.map, at, held, int(has_text), visibility, renewed_at, id_len, receipt_len,
                          len(raw) if has_text else 0)

    def record(self, index: int, pop_receipt: str, renewed_at: float) -> None:
        """After a queue call, under the slot's lock: the newest receipt and when the lease was last extended."""
        at = index * SLOT_BYTES
        _, _, visibility, _, id_len, _, _ = _HEADER.unpack_from(self.map, at)
        self._write_receipt(index, pop_receipt, renewed_at, visibility, id_len)

    def free(self, index: int) -> None:
        """Under the slot's lock: the message is settled (or lost); the supervisor leaves it alone from now on."""
        at = index * SLOT_BYTES
        self.map[at] = 0
        with self._claim_lock:
            self._claimed.discard(index)

    def _write_receipt(self, index: int, pop_receipt: str, renewed_at: float, visibility_timeout_s: int, id_len: int) -> None:
        at = index * SLOT_BYTES
        raw = pop_receipt.encode()[:_RECEIPT_MAX]
        self.map[at + _RECEIPT_AT:at + _RECEIPT_AT + len(raw)] = raw
        _, has_text, _, _, _, _, text_len = _HEADER.unpack_from(self.map, at)
        _HEADER.pack_into(self.map, at, 1, has_text, visibility_timeout_s, renewed_at, id_len, len(raw), text_len)

    # -- either side

    def read(self, index: int) -> HeldMessage | None:
        """Caller holds the slot's lock. None for a free slot."""
        at = index * SLOT_BYTES
        held, has_text, visibility, renewed_at, id_len, receipt_len, text_len = _HEADER.unpack_from(self.map, at)
        if not held:
            return None
        text = bytes(self.map[at + _TEXT_AT:at + _TEXT_AT + text_len]).decode() if has_text else None
        return HeldMessage(index, bytes(self.map[at + _ID_AT:at + _ID_AT + id_len]).decode(),
                           bytes(self.map[at + _RECEIPT_AT:at + _RECEIPT_AT + receipt_len]).decode(),
                           renewed_at, visibility, text)

    def pop_receipt(self, index: int) -> str:
        at = index * SLOT_BYTES
        receipt_len = _HEADER.unpack_from(self.map, at)[5]
        return bytes(self.map[at + _RECEIPT_AT:at + _RECEIPT_AT + receipt_len]).decode()

    def renewed_at(self, index: int) -> float:
        value: float = _HEADER.unpack_from(self.map, index * SLOT_BYTES)[3]
        return value

    def held_indices(self) -> list[int]:
        """Slots that look held (read without locks: confirm under the lock)."""
        return [i for i in range(self.slots) if self.map[i * SLOT_BYTES]]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def _unlinked_file() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="spot-leases-")
    os.unlink(path)
    return fd
