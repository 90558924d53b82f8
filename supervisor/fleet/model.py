"""What one look at the fleet sees: the backlog, each scale set and its instances, retire requests.

Also the parsing of ARM's JSON into these (defensive: a malformed answer is an error for that scale
set, never a crash), so that `decide` works on plain values only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Why a scale set could not be read or written: shown in plan/status, never a crash.
FORBIDDEN, NOT_FOUND, UNREACHABLE, BAD_ANSWER = "forbidden", "not_found", "unreachable", "bad_answer"
TAG_TOTAL_NODES = "TOTAL_NODES"


class BadArmAnswer(ValueError):
    """ARM answered 2xx with something that is not the documented shape."""


@dataclass(frozen=True)
class Backlog:
    visible: int
    in_flight: int
    exact: bool = True  # False: more than one peek's worth visible, so in_flight is a lower bound
    error: str | None = None

    @property
    def total(self) -> int:
        return self.visible + self.in_flight


@dataclass(frozen=True)
class InstanceView:
    instance_id: str
    name: str
    resource_id: str
    provisioning: str  # lower case: succeeded, creating, failed, deleting, ...
    power: str  # lower case: running, starting, deallocated, stopped, ... ("" when not reported)
    healthy: bool | None = None  # None: no health report

    @property
    def state(self) -> str:
        """One of: failed, deleting, deallocated, running, starting."""
        if self.provisioning == "failed" or self.healthy is False:
            return "failed"
        if self.provisioning == "deleting" or self.power in ("deleting",):
            return "deleting"
        if self.power in ("deallocated", "deallocating", "stopped", "stopping"):
            return "deallocated"
        if self.power == "running" and self.provisioning == "succeeded":
            return "running"
        return "starting"


@dataclass(frozen=True)
class ScaleSetView:
    id: str
    capacity: int | None = None  # None: unknown (never read)
    tags: Mapping[str, str] = field(default_factory=dict)
    eviction_policy: str = ""
    instances: tuple[InstanceView, ...] = ()
    error_kind: str | None = None
    error: str | None = None

    @property
    def name(self) -> str:
        return self.id.rsplit("/", 1)[-1]

    @property
    def reachable(self) -> bool:
        return self.error_kind is None

    def count(self, state: str) -> int:
        return sum(1 for i in self.instances if i.state == state)


@dataclass(frozen=True)
class RetireRequest:
    resource_id: str
    vm_name: str
    at: float
    message_id: str = ""
    pop_receipt: str = ""


def parse_scale_set(scale_set_id: str, doc: Any, instances: list[Any]) -> ScaleSetView:
    if not isinstance(doc, dict):
        raise BadArmAnswer(f"scale set answer is not an object: {type(doc).__name__}")
    sku = doc.get("sku")
    capacity = sku.get("capacity") if isinstance(sku, dict) else None
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 0 <= capacity <= 1_000_000:
        raise BadArmAnswer(f"sku.capacity is not a whole number: {str(capacity)[:80]!r}")
    tags = doc.get("tags") or {}
    if not isinstance(tags, dict):
        raise BadArmAnswer("tags is not an object")
    policy = _text(_obj(_obj(doc, "properties"), "virtualMachineProfile"), "evictionPolicy")
    return ScaleSetView(scale_set_id, capacity, {str(k): str(v) for k, v in tags.items()}, policy,
                        tuple(parse_instance(scale_set_id, item) for item in instances))


def parse_instance(scale_set_id: str, item: Any) -> InstanceView:
    if not isinstance(item, dict):
        raise BadArmAnswer("an instance is not an object")
    instance_id, name = item.get("instanceId"), item.get("name")
    if not isinstance(instance_id, str) or not isinstance(name, str) or not instance_id or len(instance_id) > 64:
        raise BadArmAnswer("an instance has no instanceId or name")
    resource_id = _text(item, "id") or f"{scale_set_id}/virtualMachines/{instance_id}"
    properties = _obj(item, "properties")
    provisioning = _text(properties, "provisioningState").lower()
    view = _obj(properties, "instanceView")
    power, healthy = "", None
    statuses = view.get("statuses")
    for status in statuses if isinstance(statuses, list) else []:
        code = status.get("code") if isinstance(status, dict) else None
        if not isinstance(code, str):
            continue
        kind, _, value = code.partition("/")
        if kind == "PowerState":
            power = value.lower()
        elif kind == "ProvisioningState" and not provisioning:
            provisioning = value.split("/")[0].lower()
    health_code = _text(_obj(_obj(view, "vmHealth"), "status"), "code")
    if health_code.startswith("HealthState/"):
        state = health_code.removeprefix("HealthState/").lower()
        healthy = {"healthy": True, "unhealthy": False}.get(state)
    return InstanceView(instance_id, name, resource_id, provisioning, power, healthy)


def _obj(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _text(parent: dict[str, Any], key: str) -> str:
    value = parent.get(key)
    return value if isinstance(value, str) else ""


def tag_target(view: ScaleSetView) -> int | None:
    """The integer TOTAL_NODES tag (VMScaler's), or None when absent or not a whole number >= 0."""
    text = next((v for k, v in view.tags.items() if k.upper() == TAG_TOTAL_NODES), None)
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return int(value) if math.isfinite(value) and value >= 0 and value == int(value) else None
