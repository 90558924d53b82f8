"""Looking into a queue from a test: counts, ids and texts of what is on it, and a base64 client."""

from __future__ import annotations

import json

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, TextBase64DecodePolicy, TextBase64EncodePolicy

from testsupport.azurite import Azurite
from worker.message import Codec, Envelope
from worker.queue.poisoned import read_poisoned


def message_count(client: QueueClient) -> int:
    """Visible and invisible messages; 0 when the queue does not exist."""
    try:
        return client.get_queue_properties().approximate_message_count or 0
    except ResourceNotFoundError:
        return 0


def visible_count(client: QueueClient) -> int:
    """Messages visible now (peek sees only visible ones, at most 32)."""
    return len(client.peek_messages(max_messages=32))


def visible_ids(client: QueueClient) -> set[str]:
    """Every message visible now, however many (received: hidden for a minute by this client afterwards)."""
    return {m.id for m in client.receive_messages(messages_per_page=32, max_messages=5000, visibility_timeout=60)}


def peek_texts(client: QueueClient) -> list[str]:
    """Raw text of every visible message (up to 32), [] when the queue does not exist."""
    try:
        return [m.content for m in client.peek_messages(max_messages=32)]
    except ResourceNotFoundError:
        return []


def peek_opened(client: QueueClient, encoding: str = "none") -> list[tuple[Envelope, str]]:
    """(envelope, body) of every visible message (up to 32), as a consumer would open it."""
    codec = Codec(encoding)
    return [codec.open(m.content, m.id) for m in client.peek_messages(max_messages=32)]


def poisoned_originals(client: QueueClient) -> list[str]:
    """The original text of every message in a poison queue (up to 32), without the note in front of it."""
    return [read_poisoned(text)[0] for text in peek_texts(client)]


def b64_client(azurite: Azurite, name: str) -> QueueClient:
    return QueueClient.from_connection_string(azurite.connection_string, name, message_encode_policy=TextBase64EncodePolicy(),
                                              message_decode_policy=TextBase64DecodePolicy())


def enqueue_sample_work(client: QueueClient, count: int, chunks: int, chunk_ms: float) -> None:
    """Messages for the sample handler (worker/sample.py): `chunks` checkpointed chunks of `chunk_ms` CPU work each."""
    for n in range(count):
        client.send_message(json.dumps({"n": n, "chunks": chunks, "chunk_ms": chunk_ms}))
