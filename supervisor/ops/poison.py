"""`spot-supervisor poison list | requeue | purge`: look into `<queue>-poison` and replay it.

Same settings and identity as the service (connection string or managed
identity). Requeue sends the original text to the main queue first and only
then deletes it from the poison queue: a failure in between leaves a copy in
both, never in neither.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.storage.queue import QueueClient, QueueMessage

from worker.message import Codec, UndecodableMessage
from worker.queue.client import make_queue_client
from worker.queue.poisoned import read_poisoned
from worker.settings import MAX_MESSAGES_PER_CALL, QueueSettings

log = logging.getLogger(__name__)

HOLD_S = 120  # how long requeue keeps a received poison message hidden while it works
PREVIEW_CHARS = 80


class PoisonError(Exception):
    """One line for the operator; exit 1."""


@dataclass(frozen=True)
class PoisonedMessage:
    id: str  # in the poison queue: what requeue takes
    inserted_on: str | None  # when the producer enqueued it, when known; else when it was poisoned
    poisoned_at: str | None
    dequeue_count: int | None  # how often the main queue had handed it out, when known
    reason: str | None
    original_id: str | None
    body_bytes: int
    body_preview: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_poisoned(settings: QueueSettings, limit: int = MAX_MESSAGES_PER_CALL) -> tuple[list[PoisonedMessage], int | None]:
    """Up to `limit` (≤ 32) messages, oldest first, without touching them; and the approximate total."""
    client = make_queue_client(settings, settings.poison_name)
    codec = Codec(settings.message_encoding)
    try:
        total = client.get_queue_properties().approximate_message_count
        peeked = client.peek_messages(max_messages=min(limit, MAX_MESSAGES_PER_CALL))
    except ResourceNotFoundError:
        return [], 0
    return [describe_poisoned(m, codec) for m in peeked], total


def describe_poisoned(qm: QueueMessage, codec: Codec) -> PoisonedMessage:
    original, note = read_poisoned(qm.content or "")
    try:
        body = codec.decode_text(original)
    except UndecodableMessage as exc:
        body = f"{original} [{exc}]"
    poisoned_at = note.poisoned_at if note and note.poisoned_at else _iso(qm.inserted_on)
    return PoisonedMessage(
        id=qm.id,
        inserted_on=(note.inserted_on if note and note.inserted_on else poisoned_at),
        poisoned_at=poisoned_at,
        dequeue_count=note.dequeue_count if note else None,
        reason=note.reason if note else None,
        original_id=(note.message_id or None) if note else None,
        body_bytes=len(body.encode("utf-8")),
        body_preview=_preview(body),
    )


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when else None


def _preview(body: str) -> str:
    flat = " ".join(body.split())
    return flat if len(flat) <= PREVIEW_CHARS else flat[: PREVIEW_CHARS - 1] + "…"


@dataclass
class RequeueResult:
    requeued: list[str]  # poison-queue ids
    not_found: list[str]
    failed: list[str]  # sent or deleted failed: left in the poison queue (maybe also on the main queue)


def requeue(settings: QueueSettings, ids: Iterable[str] | None) -> RequeueResult:
    """Every message (ids None) or the given ones back on the main queue as fresh messages, original text unchanged."""
    poison = make_queue_client(settings, settings.poison_name)
    main = make_queue_client(settings, settings.name)
    wanted = None if ids is None else list(dict.fromkeys(ids))
    result = RequeueResult([], [], [])
    if not _exists(poison):
        result.not_found = list(wanted or [])
        return result
    if not _exists(main):
        raise PoisonError(f"queue {settings.name} does not exist: nothing was moved from {settings.poison_name}")

    def all_found() -> bool:
        return wanted is not None and len(result.requeued) + len(result.failed) == len(wanted)

    passed_over: list[QueueMessage] = []  # received but not wanted: given back at the end
    seen: set[str] = set()
    try:
        while not all_found():
            batch = list(poison.receive_messages(messages_per_page=MAX_MESSAGES_PER_CALL, max_messages=MAX_MESSAGES_PER_CALL,
                                                 visibility_timeout=HOLD_S))
            if not any(qm.id not in seen for qm in batch):  # empty, or round again (a very long run)
                passed_over += batch
                break
            for qm in batch:
                if qm.id not in seen and (wanted is None or qm.id in wanted) and not all_found():
                    _move_back(qm, poison, main, result)
                else:
                    passed_over.append(qm)
                seen.add(qm.id)
    finally:
        for qm in passed_over:  # visible again now, not after HOLD_S
            try:
                poison.update_message(qm.id, qm.pop_receipt, visibility_timeout=0)
            except Exception as exc:  # it reappears after HOLD_S anyway
                log.debug("could not give back %s at once: %s", qm.id, exc)
    if wanted is not None:
        done = set(result.requeued) | set(result.failed)
        result.not_found = [i for i in wanted if i not in done]
    return result


def _move_back(qm: QueueMessage, poison: QueueClient, main: QueueClient, result: RequeueResult) -> None:
    original, _ = read_poisoned(qm.content or "")
    try:
        main.send_message(original)  # first: a failure here leaves it in the poison queue
    except Exception as exc:
        log.warning("could not send %s back to %s: %s", qm.id, main.queue_name, exc)
        result.failed.append(qm.id)
        return
    try:
        poison.delete_message(qm.id, qm.pop_receipt)
    except Exception as exc:
        log.warning("sent %s back to %s but could not delete it from %s (%s): it is in both now",
                    qm.id, main.queue_name, poison.queue_name, exc)
        result.failed.append(qm.id)
        return
    result.requeued.append(qm.id)


def _exists(client: QueueClient) -> bool:
    try:
        client.get_queue_properties()
    except ResourceNotFoundError:
        return False
    return True


def purge(settings: QueueSettings) -> int | None:
    """Delete every message of the poison queue; the approximate count it had (0 when it does not exist)."""
    poison = make_queue_client(settings, settings.poison_name)
    try:
        count = poison.get_queue_properties().approximate_message_count
        poison.clear_messages()
    except ResourceNotFoundError:
        return 0
    return count


# --- output --------------------------------------------------------------------------------------


def format_list(queue: str, messages: list[PoisonedMessage], total: int | None) -> str:
    if not messages:
        return f"{queue}: empty"
    if total is None or total > len(messages):
        lines = [f"{queue}: about {total if total is not None else '?'} message(s), showing the oldest {len(messages)}"]
    else:
        lines = [f"{queue}: {len(messages)} message(s)"]
    for m in messages:
        count = f"dequeued {m.dequeue_count}×" if m.dequeue_count is not None else "dequeue count unknown"
        lines.append(f"{m.id}  inserted {m.inserted_on or '?'}  poisoned {m.poisoned_at or '?'}  {count}")
        lines.append(f"  why:  {m.reason or 'unknown'}")
        lines.append(f"  body: {m.body_preview}  ({m.body_bytes} bytes)")
    return "\n".join(lines)


def list_json(queue: str, messages: list[PoisonedMessage], total: int | None) -> str:
    return json.dumps({"queue": queue, "approximate_count": total, "messages": [m.to_dict() for m in messages]})
