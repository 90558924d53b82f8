"""Why a message is in the poison queue, stored with it.

A worker that poisons a message sends `poisoned_text(original, note)` to
`<queue>-poison`: one header line (a marker and the note as JSON, ASCII) and
then the original queue text, verbatim. `read_poisoned` is the one reader (the
`spot-supervisor poison` tools use it), so the original goes back to the queue
byte for byte. When the note would push the text past the Queue service's
64 KiB, the original goes alone and the reason is unknown; text without a
header (a message poisoned by another tool or an older version) reads as an
original with no note.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from worker.message import MAX_MESSAGE_BYTES, text_size

POISON_MARKER = "#spot-supervisor-poisoned/1 "
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
    text = POISON_MARKER + json.dumps(asdict(note), separators=(",", ":")) + "\n" + original
    return text if text_size(text) <= MAX_MESSAGE_BYTES else original


def read_poisoned(text: str) -> tuple[str, PoisonNote | None]:
    """(original queue text, note or None) of a poison-queue message."""
    if not text.startswith(POISON_MARKER):
        return text, None
    header, newline, original = text.partition("\n")
    if not newline:
        return text, None
    try:
        data: Any = json.loads(header[len(POISON_MARKER):])
        note = PoisonNote(
            reason=str(data["reason"]),
            message_id=str(data.get("message_id") or ""),
            dequeue_count=data["dequeue_count"] if isinstance(data.get("dequeue_count"), int) else None,
            inserted_on=str(data["inserted_on"]) if data.get("inserted_on") else None,
            poisoned_at=str(data["poisoned_at"]) if data.get("poisoned_at") else None,
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        return text, None  # not a header this package wrote: all of it is the original
    return original, note
