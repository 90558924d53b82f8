"""Retire requests on `<queue>-fleet`: the message a VM puts there, and the keeper's reading of it.

A message is hostile until proven otherwise: any size, any JSON (or none), any types, nested deep,
replayed. `parse_retire` returns a RetireRequest or a one-line reason why not; it never raises.
"""

from __future__ import annotations

import json
import math
import time
from collections import OrderedDict
from typing import Any

from supervisor.fleet.model import RetireRequest

FLEET_QUEUE_SUFFIX = "-fleet"
MAX_MESSAGE_CHARS = 4096
MAX_RESOURCE_ID_CHARS = 1024
MAX_VM_NAME_CHARS = 256
DEFAULT_RETIRE_WINDOW_S = 300.0  # when the keeper's own retire_when_idle_s is 0: how old a request may be


def fleet_queue_name(queue_name: str) -> str:
    return f"{queue_name}{FLEET_QUEUE_SUFFIX}"


def retire_message(resource_id: str, vm_name: str, at: float | None = None) -> str:
    """What a VM puts on `<queue>-fleet` to ask to be deleted."""
    return json.dumps({"kind": "retire", "resource_id": resource_id, "vm_name": vm_name,
                       "at": time.time() if at is None else at})


def parse_retire(text: Any, message_id: str = "", pop_receipt: str = "") -> RetireRequest | str:
    if not isinstance(text, str):
        return "not text"
    if len(text) > MAX_MESSAGE_CHARS:
        return f"too large ({len(text)} characters, at most {MAX_MESSAGE_CHARS})"
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):
        return "not JSON"
    if not isinstance(body, dict):
        return "not a JSON object"
    if body.get("kind") != "retire":
        return f"kind is not \"retire\": {str(body.get('kind'))[:40]!r}"
    resource_id, vm_name, at = body.get("resource_id"), body.get("vm_name"), body.get("at")
    if not isinstance(resource_id, str) or not resource_id.startswith("/subscriptions/") or len(resource_id) > MAX_RESOURCE_ID_CHARS:
        return "resource_id is not an Azure resource ID"
    if not isinstance(vm_name, str) or not vm_name or len(vm_name) > MAX_VM_NAME_CHARS:
        return "vm_name is not a VM name"
    if isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at) or at <= 0:
        return "at is not a unix time"
    return RetireRequest(resource_id, vm_name, float(at), message_id, pop_receipt)


class SeenRequests:
    """Requests already handled (granted or refused), so a replayed message is never acted on twice."""

    def __init__(self, limit: int = 10_000) -> None:
        self._seen: OrderedDict[tuple[str, float], None] = OrderedDict()
        self._limit = limit

    def check_and_add(self, request: RetireRequest) -> bool:
        """True if new (and now remembered)."""
        key = (request.resource_id.lower(), request.at)
        if key in self._seen:
            return False
        self._seen[key] = None
        while len(self._seen) > self._limit:
            self._seen.popitem(last=False)
        return True

    def forget(self, request: RetireRequest) -> None:
        """A granted request whose delete failed: its message comes back after the lease and may be acted on."""
        self._seen.pop((request.resource_id.lower(), request.at), None)
