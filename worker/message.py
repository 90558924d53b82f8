"""What a handler sees, and how progress travels inside the queued message itself.

A message on the queue is either the producer's original text, or an envelope
this package wrote back with `update_message`: the original text untouched,
plus the last checkpoint and how many attempts ended in a release. Keeping
both in the message means any process on any VM resumes from the checkpoint,
and poison is judged by failures only (the queue's dequeue_count also counts
releases).
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

MAX_MESSAGE_BYTES = 64 * 1024  # the Queue service's limit on a message's text
ENVELOPE_PREFIX = '{"spot-supervisor":1,'


class Interrupted(Exception):
    """Raised by a handler for "not done, not failed": the message is released at once."""


class CheckpointTooLarge(ValueError):
    """The checkpoint would push the message past the 64 KiB limit; nothing was changed."""


class UndecodableMessage(ValueError):
    """The message text is not valid for the configured encoding."""


@dataclass(frozen=True)
class Message:
    id: str
    body: str
    dequeue_count: int
    inserted_on: datetime | None


@dataclass(frozen=True)
class Envelope:
    """The message text as stored: `original` is exactly what the producer enqueued."""

    original: str
    state: Any = None
    releases: int = 0

    @property
    def is_plain(self) -> bool:
        return self.state is None and self.releases == 0


class Codec:
    """Turns queue text into (body, envelope) and envelopes back into queue text."""

    def __init__(self, encoding: str) -> None:
        if encoding not in ("none", "base64"):
            raise ValueError(f"unknown message encoding {encoding!r}")
        self.base64 = encoding == "base64"

    def decode_text(self, text: str) -> str:
        """The producer's payload from its queue text (base64 as Azure Functions and the .NET SDK write it)."""
        if not self.base64:
            return text
        try:
            raw = base64.b64decode(text.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error) as exc:
            raise UndecodableMessage(f"not valid base64: {exc}") from None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UndecodableMessage(f"base64 payload is not UTF-8 text: {exc.reason} at byte {exc.start}") from None

    def encode_text(self, payload: str) -> str:
        if not self.base64:
            return payload
        return base64.b64encode(payload.encode("utf-8")).decode("ascii")

    def open(self, text: str) -> tuple[Envelope, str]:
        """(envelope, body) for a received message; raises UndecodableMessage."""
        payload = self.decode_text(text)
        if payload.startswith(ENVELOPE_PREFIX):
            envelope = _parse_envelope(payload)
            if envelope is not None:
                return envelope, self.decode_text(envelope.original)
        return Envelope(original=text), payload

    def seal(self, envelope: Envelope) -> str:
        """Queue text for an envelope; a plain one is the original text, byte for byte."""
        if envelope.is_plain:
            return envelope.original
        payload = ENVELOPE_PREFIX + json.dumps(
            {"original": envelope.original, "releases": envelope.releases, "state": envelope.state},
            separators=(",", ":"),  # ASCII: no character the service may refuse
        )[1:]
        return self.encode_text(payload)


def _parse_envelope(payload: str) -> Envelope | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    original = data.get("original")
    releases = data.get("releases", 0)
    if not isinstance(original, str) or not isinstance(releases, int):
        return None
    return Envelope(original=original, state=data.get("state"), releases=releases)


def text_size(text: str) -> int:
    return len(text.encode("utf-8"))
