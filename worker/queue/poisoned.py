"""Why a message is in the poison queue, stored with it.

A worker that poisons a message sends `poisoned_text(original, note)` to
`<queue>-poison`: one header line (a marker and the note as JSON, ASCII) and
then the original queue text, verbatim. `read_poisoned` is the one reader (the
`spot-supervisor poison` tools use it), so the original goes back to the queue
byte for byte. When the note would push the text past the Queue service's
64 KiB, the original goes alone and the reason is unknown; text without a
header (a message poisoned by another tool or an older version) reads as an
original with no note.

The note is tied to the text it was written for: it carries the SHA-256 of the
original, and a header line whose digest does not match what follows it is
producer text like any other (a message poisoned without a note may begin with a
line that merely looks like one; requeue must not strip it). Notes of version 1,
written before the digest, are still read as notes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from worker.common import jsonsafe
from worker.message import MAX_MESSAGE_BYTES, text_size

POISON_MARKER = "#spot-supervisor-poisoned/2 "
LEGACY_POISON_MARKER = "#spot-supervisor-poisoned/1 "  # no digest: read as written, never written again
MAX_NOTE_BYTES = 8192  # a note is a few hundred bytes (the reason is cut at MAX_REASON_CHARS)
MAX_REASON_CHARS = 500


@dataclass(frozen=True)
class PoisonNote:
    reason: str
    message_id: str = ""  # its id on the main queue
    dequeue_count: int | None = None  # how often the main queue had handed it out
    inserted_on: str | None = None  # when the producer enqueued it (ISO 8601)
    poisoned_at: str | None = None


def poisoned_text(original: str, reason: str, message_id: str = "", dequeue_count: int | None = None,
                  inserted_on: datetime | None = None) -> str:
    """What goes to the poison queue: the note, then the original text; the original alone if it would not fit."""
    note = PoisonNote(reason[:MAX_REASON_CHARS], message_id, dequeue_count,
                      inserted_on.isoformat() if inserted_on else None,
                      datetime.now(timezone.utc).isoformat(timespec="seconds"))
    header = {**asdict(note), "sha256": digest(original)}
    text = POISON_MARKER + json.dumps(header, separators=(",", ":")) + "\n" + original
    return text if text_size(text) <= MAX_MESSAGE_BYTES else original


def digest(original: str) -> str:
    return hashlib.sha256(original.encode("utf-8", "surrogatepass")).hexdigest()


def read_poisoned(text: str) -> tuple[str, PoisonNote | None]:
    """(original queue text, note or None) of a poison-queue message."""
    marker = next((m for m in (POISON_MARKER, LEGACY_POISON_MARKER) if text.startswith(m)), None)
    if marker is None:
        return text, None
    header, newline, original = text.partition("\n")
    if not newline:
        return text, None
    try:
        data: Any = jsonsafe.loads(header[len(marker):], max_bytes=MAX_NOTE_BYTES, max_depth=2)
        if marker == POISON_MARKER and data.get("sha256") != digest(original):
            return text, None  # not written for this text: all of it is the original
        note = PoisonNote(
            reason=str(data["reason"]),
            message_id=str(data.get("message_id") or ""),
            dequeue_count=data["dequeue_count"] if isinstance(data.get("dequeue_count"), int) else None,
            inserted_on=str(data["inserted_on"]) if data.get("inserted_on") else None,
            poisoned_at=str(data["poisoned_at"]) if data.get("poisoned_at") else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):  # jsonsafe.JsonError is a ValueError
        return text, None  # not a header this package wrote: all of it is the original
    return original, note
