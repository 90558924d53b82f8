"""The sample handler: CPU-bound work in chunks, checkpointing after each one.

Body: free text, or JSON such as {"chunks": 20, "chunk_ms": 50}. Each chunk
hashes the running digest for about chunk_ms of CPU time; after every chunk the
progress is checkpointed, so an eviction mid-message resumes on the next
worker (any VM) from the last finished chunk. When a drain starts, it stops
between chunks and raises Interrupted so the message is released at once.

If SPOT_SAMPLE_RESULTS names a file, one JSON line per completed message is
appended to it (the local demo counts them to prove nothing was lost).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

from worker.context import Context
from worker.message import Interrupted, Message

DEFAULT_CHUNKS = 5
DEFAULT_CHUNK_MS = 10.0


def handle(message: Message, ctx: Context) -> None:
    chunks, chunk_ms = _parameters(message.body)
    state: dict[str, Any] = ctx.state or {"chunk": 0, "digest": hashlib.sha256(message.body.encode()).hexdigest()}
    resumed_from = state["chunk"]
    digest = bytes.fromhex(state["digest"])
    for chunk in range(state["chunk"], chunks):
        if ctx.draining:
            ctx.logger.info("message %s: draining, stopping after chunk %d of %d", message.id, chunk, chunks)
            raise Interrupted()
        digest = burn(digest, chunk_ms / 1000.0)
        ctx.checkpoint({"chunk": chunk + 1, "digest": digest.hex()})
    _record(message, resumed_from, chunks, digest.hex())


def _parameters(body: str) -> tuple[int, float]:
    try:
        data = json.loads(body)
    except ValueError:
        return DEFAULT_CHUNKS, DEFAULT_CHUNK_MS
    if not isinstance(data, dict):
        return DEFAULT_CHUNKS, DEFAULT_CHUNK_MS
    return int(data.get("chunks", DEFAULT_CHUNKS)), float(data.get("chunk_ms", DEFAULT_CHUNK_MS))


def burn(digest: bytes, seconds: float) -> bytes:
    """`seconds` of CPU time chaining SHA-256, measured on this thread's CPU clock."""
    until = time.thread_time() + seconds
    while time.thread_time() < until:
        for _ in range(200):
            digest = hashlib.sha256(digest).digest()
    return digest


def _record(message: Message, resumed_from: int, chunks: int, digest: str) -> None:
    path = os.environ.get("SPOT_SAMPLE_RESULTS")
    if not path:
        return
    line = json.dumps({"id": message.id, "body": message.body, "chunks": chunks, "resumed_from": resumed_from,
                       "dequeue_count": message.dequeue_count, "pid": os.getpid(), "digest": digest})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one write with O_APPEND: lines from many processes never interleave
    finally:
        os.close(fd)
