"""`spot-supervisor enqueue`: put generated test messages, or the lines of a file, on the queue."""

from __future__ import annotations

import io
import json
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from worker.message import MAX_MESSAGE_BYTES, Codec, text_size
from worker.queue.client import ensure_queue, make_queue_client
from worker.settings import QueueSettings

SENDERS = 8


class EnqueueError(Exception):
    pass


def generated_bodies(count: int, chunks: int, chunk_ms: float, start: int = 0) -> Iterator[str]:
    for n in range(start, start + count):
        yield json.dumps({"n": n, "chunks": chunks, "chunk_ms": chunk_ms})


def file_bodies(stream: TextIO, name: str) -> Iterator[str]:
    """One body per line that holds more than whitespace (the line as is, without its line break)."""
    try:
        for line in stream:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line
    except UnicodeDecodeError:  # decoding runs ahead in blocks: no line number to give
        raise EnqueueError(f"{name} is not UTF-8 text (a binary file?); nothing was sent") from None


def enqueue(settings: QueueSettings, bodies: Iterator[str]) -> int:
    """Send every body (encoded as configured); returns how many were sent."""
    codec = Codec(settings.message_encoding)
    client = make_queue_client(settings)
    ensure_queue(client)
    texts = []
    for index, body in enumerate(bodies, 1):
        text = codec.encode_text(body)
        if text_size(text) > MAX_MESSAGE_BYTES:
            raise EnqueueError(f"message {index} is {text_size(text)} bytes once encoded, "
                               f"over the queue's {MAX_MESSAGE_BYTES}-byte limit; nothing was sent")
        texts.append(text)
    with ThreadPoolExecutor(SENDERS) as pool:
        for _ in pool.map(client.send_message, texts):
            pass
    return len(texts)


def run_enqueue(settings: QueueSettings, count: int | None, path: str | None, chunks: int, chunk_ms: float) -> int:
    started = time.perf_counter()
    if path is None:
        sent = enqueue(settings, generated_bodies(count or 0, chunks, chunk_ms))
    elif path == "-":
        stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8")
        sent = enqueue(settings, file_bodies(stdin, "standard input"))
    else:
        with open(path, encoding="utf-8") as stream:
            sent = enqueue(settings, file_bodies(stream, path))
    print(f"enqueued {sent} message(s) on {settings.name} in {time.perf_counter() - started:.2f}s")
    return 0
