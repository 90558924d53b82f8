"""What a handler sees, and how progress travels inside the queued message itself.

A message on the queue is either the producer's text, or an envelope this
package wrote back with `update_message`: a one-line header (the last
checkpoint, how many attempts ended in a release and how many in a failure)
followed by the producer's payload verbatim. Keeping them in the message means
any process on any VM resumes from the checkpoint, and poison is judged by
failures only (the queue's dequeue_count also counts releases, and deliveries
whose handler never ran: see worker.queue.consumer.judged_failures).

Only this system can write an envelope a consumer trusts: the header names the
id the Queue service gave the message, which a producer cannot know when it
writes the text (update_message keeps the id; put assigns a new random one).
Text that looks like an envelope but names another id, or none, is producer
text like any other and reaches the handler as its body, untouched.

The payload follows the header unescaped (in base64 mode the header and the
payload's bytes are encoded together, once), so an envelope is its body plus a
small header, never a multiple of it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

MAX_MESSAGE_BYTES = 64 * 1024  # the Queue service's limit on a message's text
ENVELOPE_MARKER = "#spot-supervisor/2"
LEGACY_ENVELOPE_PREFIX = '{"spot-supervisor":1,'  # what versions before 2 wrote: see Codec.open
MAX_STATE_DEPTH = 64  # nesting levels a checkpoint may have
MAX_ATTEMPT_COUNT = 10**9  # bound on the releases and failures a header may claim
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"))  # one, not one per json.dumps call


class Interrupted(Exception):
    """Raised by a handler for "not done, not failed": the message is released at once."""


class CheckpointTooLarge(ValueError):
    """The checkpoint would push the message past the 64 KiB limit, or nests too deep; nothing was changed."""


class UndecodableMessage(ValueError):
    """The message text is not valid for the configured encoding, or its envelope is damaged."""


@dataclass(frozen=True)
class Message:
    id: str
    body: str
    dequeue_count: int
    inserted_on: datetime | None


@dataclass(frozen=True)
class Envelope:
    """The message as stored: `original` is exactly the queue text the producer enqueued."""

    original: str
    state: Any = None
    releases: int = 0
    failures: int = 0  # attempts whose handler ran and failed (recorded by the retry's update)
    # Opened from a version-1 envelope: the next settle writes the current form, even a retry.
    upgraded: bool = field(default=False, compare=False)

    @property
    def is_plain(self) -> bool:
        return self.state is None and self.releases == 0 and self.failures == 0


class Codec:
    """Turns queue text into (envelope, body) and envelopes back into queue text."""

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

    def open(self, text: str, message_id: str) -> tuple[Envelope, str]:
        """(envelope, body) for a received message; raises UndecodableMessage."""
        payload = self.decode_text(text)
        own = f"{ENVELOPE_MARKER} {message_id} "
        if payload.startswith(own):
            header, newline, body = payload[len(own):].partition("\n")
            if not newline:
                raise UndecodableMessage("damaged envelope: its header has no end")
            releases, state, failures = parse_header(header)
            # In base64 mode the original is re-encoded from its payload: the same text for every
            # canonical encoder (Azure Functions, the SDKs), which is what producers write.
            return Envelope(self.encode_text(body), state, releases, failures), body
        if payload.startswith(LEGACY_ENVELOPE_PREFIX):
            # Written by version 1, which trusted any text with this prefix. Only its `original` is used
            # (a forged one is no worse than sending that text): its checkpoint and release count cannot be
            # told from a producer's forgery, so they are dropped, and its earlier attempts are not counted
            # at all (see Consumer._open).
            original = _legacy_original(payload)
            if original is not None:
                return Envelope(original, upgraded=True), self.decode_text(original)
        return Envelope(text), payload

    def seal(self, envelope: Envelope, message_id: str) -> str:
        """Queue text for an envelope; a plain one is the original text, byte for byte."""
        if envelope.is_plain:
            return envelope.original
        fields: dict[str, Any] = {"releases": envelope.releases, "state": envelope.state}
        if envelope.failures:  # only when there are some: a header without it stays readable by earlier versions
            fields["failures"] = envelope.failures
        header = _HEADER_ENCODER.encode(fields)
        # ASCII header (no character the service may refuse); the payload was accepted once, so it is again.
        return self.encode_text(f"{ENVELOPE_MARKER} {message_id} {header}\n{self.decode_text(envelope.original)}")


def parse_header(header: str) -> tuple[int, Any, int]:
    """(releases, state, failures) from an envelope header; raises UndecodableMessage naming what is wrong."""
    try:
        data = json.loads(header)
    except (ValueError, RecursionError) as exc:
        raise UndecodableMessage(f"damaged envelope header: {type(exc).__name__}") from None
    if not isinstance(data, dict) or set(data) - {"failures"} != {"releases", "state"}:
        raise UndecodableMessage("damaged envelope header: expected exactly the keys releases and state (and failures)")
    for key in ("releases", "failures"):
        count = data.get(key, 0)
        if type(count) is not int or not 0 <= count <= MAX_ATTEMPT_COUNT:
            raise UndecodableMessage(f"damaged envelope header: {key} must be an integer in [0, {MAX_ATTEMPT_COUNT}]")
    if json_depth(data["state"]) > MAX_STATE_DEPTH:
        raise UndecodableMessage(f"damaged envelope header: state nests deeper than {MAX_STATE_DEPTH} levels")
    return data["releases"], data["state"], data.get("failures", 0)


def _legacy_original(payload: str) -> str | None:
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # e.g. 3,000 nested brackets: producer text, not an envelope
        return None
    if not isinstance(data, dict) or not isinstance(data.get("original"), str):
        return None
    original: str = data["original"]
    return original


def json_depth(value: Any) -> int:
    """Nesting depth of decoded JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, (list, tuple)):
            depth += 1
            deepest = max(deepest, depth)
            stack.extend((child, depth) for child in item)
    return deepest


def text_size(text: str) -> int:
    return len(text.encode("utf-8"))
