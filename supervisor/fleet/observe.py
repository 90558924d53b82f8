"""Reading the facts for one pass: the work queue's backlog and `<queue>-fleet`'s retire requests.

`plan` and `status` only peek (nothing is taken off any queue); `run` receives retire requests under a
short lease and deletes each message once it was acted on or refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.storage.queue import QueueClient

from supervisor.fleet.model import Backlog, RetireRequest
from supervisor.fleet.retire import fleet_queue_name, parse_retire
from worker.queue.client import describe, ensure_queue, make_queue_client
from worker.settings import QueueSettings

log = logging.getLogger(__name__)

PEEK_LIMIT = 32  # the Queue service's most messages per peek
RETIRE_LEASE_S = 60


@dataclass(frozen=True)
class RetireInbox:
    requests: list[RetireRequest]
    rejected: list[tuple[str, str, str]]  # (message id, pop receipt, why) for messages that are no retire request
    error: str | None = None


def read_backlog(settings: QueueSettings) -> Backlog:
    """Visible and in-flight messages. ApproximateMessageCount counts both (leased messages too); a peek sees
    only visible ones, up to 32: below that, the split is exact."""
    client = make_queue_client(settings)
    try:
        total = client.get_queue_properties().approximate_message_count or 0
        visible = sum(1 for _ in client.peek_messages(max_messages=PEEK_LIMIT))
    except ResourceNotFoundError:
        return Backlog(0, 0, error=f"queue {settings.name} does not exist")
    except AzureError as exc:
        return Backlog(0, 0, exact=False, error=f"queue {settings.name}: {describe(exc)}")
    finally:
        client.close()
    if visible < PEEK_LIMIT:
        return Backlog(visible, max(0, total - visible))
    return Backlog(max(visible, total), 0, exact=False)


def peek_retire_requests(settings: QueueSettings) -> RetireInbox:
    """Read-only (plan, status)."""
    client = make_queue_client(settings, fleet_queue_name(settings.name))
    try:
        messages = [(m.id, m.content) for m in client.peek_messages(max_messages=PEEK_LIMIT)]
    except ResourceNotFoundError:
        return RetireInbox([], [])
    except AzureError as exc:
        return RetireInbox([], [], f"{fleet_queue_name(settings.name)}: {describe(exc)}")
    finally:
        client.close()
    return _sort(messages, {})


def fleet_queue(settings: QueueSettings) -> QueueClient:
    client = make_queue_client(settings, fleet_queue_name(settings.name))
    ensure_queue(client)
    return client


def receive_retire_requests(client: QueueClient) -> RetireInbox:
    """`run`: up to 32 messages, leased for RETIRE_LEASE_S; the caller deletes each after acting on it."""
    try:
        received = list(client.receive_messages(messages_per_page=PEEK_LIMIT, max_messages=PEEK_LIMIT,
                                                visibility_timeout=RETIRE_LEASE_S))
    except AzureError as exc:
        return RetireInbox([], [], f"{client.queue_name}: {describe(exc)}")
    receipts = {m.id: m.pop_receipt or "" for m in received}
    return _sort([(m.id, m.content) for m in received], receipts)


def forget_message(client: QueueClient, message_id: str, pop_receipt: str) -> None:
    try:
        client.delete_message(message_id, pop_receipt)
    except AzureError as exc:
        log.warning("fleet: could not delete retire message %s: %s", message_id, describe(exc))


def _sort(messages: list[tuple[str, object]], receipts: dict[str, str]) -> RetireInbox:
    requests: list[RetireRequest] = []
    rejected: list[tuple[str, str, str]] = []
    for message_id, content in messages:
        parsed = parse_retire(content, message_id, receipts.get(message_id, ""))
        if isinstance(parsed, str):
            rejected.append((message_id, receipts.get(message_id, ""), parsed))
        else:
            requests.append(parsed)
    return RetireInbox(requests, rejected)
