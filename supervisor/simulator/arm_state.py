"""The model behind the Azure Resource Manager stand-in: scale sets, their instances, evictions, faults.

Only the scale-set operations the fleet keeper uses are modelled. Writes take effect at once and are
reported as long-running operations whose final status is kept here (`operation`), as ARM does:
an allocation the scale set cannot fit ends the operation `Failed` with a capacity error code.

Hooks (`on_create`, `on_remove`, `on_evict`, `on_start`) let the demo back each instance with a real
`spot-supervisor run` process; they run outside the lock.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
DEFAULT_RESOURCE_GROUP = "rg-fleet"
FAULT_MODES = ("403", "404", "429", "500", "503", "stall", "garbage", "deep")


class StandInError(Exception):
    """An ARM error answer: HTTP status plus {"error": {"code", "message"}}."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Instance:
    instance_id: str
    name: str
    provisioning: str = "Creating"  # Creating -> Succeeded (or Failed); Deleting
    power: str = "starting"  # starting -> running; deallocated after a Deallocate eviction
    health: str | None = None  # "healthy" / "unhealthy", as an application-health extension reports
    ready_at: float = 0.0  # when Creating/starting become Succeeded/running


@dataclass
class Fault:
    mode: str
    count: int
    retry_after_s: float | None = None
    methods: tuple[str, ...] = ()  # empty: every method


@dataclass
class ScaleSet:
    subscription: str
    resource_group: str
    name: str
    eviction_policy: str = "Delete"
    sku_name: str = "Standard_D2s_v3"
    tags: dict[str, str] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    next_id: int = 0
    available: int | None = None  # how many instances may be allocated at once (None: no limit)
    refusal_code: str = "AllocationFailed"
    faults: list[Fault] = field(default_factory=list)

    @property
    def id(self) -> str:
        return (f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.Compute/virtualMachineScaleSets/{self.name}")

    @property
    def capacity(self) -> int:
        return len(self.instances)

    def allocated(self) -> int:
        return sum(1 for i in self.instances.values() if i.power not in ("deallocated", "deallocating"))


class ArmState:
    """Thread-safe; every public method is one ARM call or one control action."""

    def __init__(self, create_delay_s: float = 0.0) -> None:
        self.create_delay_s = create_delay_s
        self.lock = threading.RLock()
        self.scale_sets: dict[str, ScaleSet] = {}  # lower-case resource ID -> scale set
        self.operations: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) in order
        self.on_create: Callable[[ScaleSet, Instance], None] | None = None
        self.on_remove: Callable[[ScaleSet, Instance], None] | None = None
        self.on_evict: Callable[[ScaleSet, Instance], None] | None = None
        self.on_start: Callable[[ScaleSet, Instance], None] | None = None

    # -- control ---------------------------------------------------------------

    def add_scale_set(self, name: str, *, eviction_policy: str = "Delete", capacity: int = 0,
                      available: int | None = None, refusal_code: str = "AllocationFailed",
                      tags: dict[str, str] | None = None, subscription: str = DEFAULT_SUBSCRIPTION,
                      resource_group: str = DEFAULT_RESOURCE_GROUP) -> str:
        with self.lock:
            scale_set = ScaleSet(subscription, resource_group, name, eviction_policy=eviction_policy,
                                 tags=dict(tags or {}), available=available, refusal_code=refusal_code)
            self.scale_sets[scale_set.id.lower()] = scale_set
        if capacity:
            self.update_capacity(scale_set.id, capacity)
        return scale_set.id

    def find(self, scale_set_id: str) -> ScaleSet:
        with self.lock:
            scale_set = self.scale_sets.get(scale_set_id.rstrip("/").lower())
        if scale_set is None:
            raise StandInError(404, "ResourceNotFound", f"The Resource '{scale_set_id}' was not found.")
        return scale_set

    def set_allocation(self, scale_set_id: str, available: int | None, refusal_code: str | None = None) -> None:
        with self.lock:
            scale_set = self.find(scale_set_id)
            scale_set.available = available
            if refusal_code:
                scale_set.refusal_code = refusal_code

    def set_tags(self, scale_set_id: str, tags: dict[str, str]) -> None:
        with self.lock:
            self.find(scale_set_id).tags = dict(tags)

    def add_fault(self, scale_set_id: str, mode: str, count: int = 1, retry_after_s: float | None = None,
                  methods: tuple[str, ...] = ()) -> None:
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {', '.join(FAULT_MODES)}, got {mode!r}")
        with self.lock:
            self.find(scale_set_id).faults.append(Fault(mode, count, retry_after_s, tuple(m.upper() for m in methods)))

    def take_fault(self, scale_set_id: str, method: str) -> Fault | None:
        with self.lock:
            scale_set = self.scale_sets.get(scale_set_id.lower())
            if scale_set is None:
                return None
            for fault in scale_set.faults:
                if fault.methods and method not in fault.methods:
                    continue
                if fault.count > 0:
                    fault.count -= 1
                if fault.count == 0:
                    scale_set.faults.remove(fault)
                return fault
        return None

    def evict(self, scale_set_id: str, instance_id: str) -> dict[str, Any]:
        """Spot eviction: Delete removes the instance (capacity drops); Deallocate stops it (it still counts)."""
        with self.lock:
            scale_set = self.find(scale_set_id)
            instance = self._instance(scale_set, instance_id)
            if scale_set.eviction_policy == "Delete":
                del scale_set.instances[instance_id]
            else:
                instance.power = "deallocated"
            result = {"instance_id": instance_id, "policy": scale_set.eviction_policy}
        self._hook(self.on_evict, scale_set, instance)
        return result

    def fail_instance(self, scale_set_id: str, instance_id: str, health: bool = False) -> None:
        """provisioningState Failed (or, with health=True, an unhealthy application-health report)."""
        with self.lock:
            instance = self._instance(self.find(scale_set_id), instance_id)
            if health:
                instance.health = "unhealthy"
            else:
                instance.provisioning = "Failed"

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {s.name: {"id": s.id, "capacity": s.capacity, "available": s.available,
                             "instances": {i.instance_id: {"name": i.name, "provisioning": self._provisioning(i),
                                                           "power": self._power(i)}
                                           for i in s.instances.values()}}
                    for s in self.scale_sets.values()}

    def count_requests(self, method: str, suffix: str = "") -> int:
        with self.lock:
            return sum(1 for m, p in self.requests if m == method and p.endswith(suffix))

    # -- ARM operations -------------------------------------------------------

    def scale_set_document(self, scale_set_id: str) -> dict[str, Any]:
        with self.lock:
            s = self.find(scale_set_id)
            return {
                "id": s.id, "name": s.name, "type": "Microsoft.Compute/virtualMachineScaleSets", "location": "eastus2",
                "tags": dict(s.tags), "sku": {"name": s.sku_name, "tier": "Standard", "capacity": s.capacity},
                "properties": {
                    "orchestrationMode": "Uniform", "provisioningState": "Succeeded",
                    "virtualMachineProfile": {"priority": "Spot", "evictionPolicy": s.eviction_policy,
                                              "billingProfile": {"maxPrice": -1}},
                },
            }

    def instance_documents(self, scale_set_id: str) -> list[dict[str, Any]]:
        with self.lock:
            s = self.find(scale_set_id)
            return [self._instance_document(s, i) for i in sorted(s.instances.values(), key=lambda i: int(i.instance_id))]

    def update_capacity(self, scale_set_id: str, capacity: int) -> dict[str, Any]:
        """PATCH sku.capacity. More: new instances as far as the allocation allows; fewer: the newest go."""
        created: list[Instance] = []
        removed: list[Instance] = []
        with self.lock:
            s = self.find(scale_set_id)
            refused = 0
            while s.capacity < capacity:
                if s.available is not None and s.allocated() >= s.available:
                    refused = capacity - s.capacity
                    break
                instance = Instance(str(s.next_id), f"{s.name}_{s.next_id}", ready_at=time.monotonic() + self.create_delay_s)
                s.next_id += 1
                s.instances[instance.instance_id] = instance
                created.append(instance)
            while s.capacity > capacity:
                newest = max(s.instances, key=int)
                removed.append(s.instances.pop(newest))
            operation = self._operation(None if not refused else (s.refusal_code, (
                f"Allocation failed. We do not have sufficient capacity for {refused} of the requested VMs "
                f"in scale set {s.name}. Please try again later or choose another size, region or zone.")))
        for instance in created:
            self._hook(self.on_create, s, instance)
        for instance in removed:
            self._hook(self.on_remove, s, instance)
        return operation

    def delete_instances(self, scale_set_id: str, instance_ids: list[str]) -> dict[str, Any]:
        with self.lock:
            s = self.find(scale_set_id)
            unknown = [i for i in instance_ids if i not in s.instances]
            if unknown or not instance_ids:
                raise StandInError(400, "InvalidParameter", f"Instance IDs not found in scale set {s.name}: {unknown}")
            removed = [s.instances.pop(i) for i in instance_ids]
            operation = self._operation(None)
        for instance in removed:
            self._hook(self.on_remove, s, instance)
        return operation

    def start_instances(self, scale_set_id: str, instance_ids: list[str]) -> dict[str, Any]:
        started: list[Instance] = []
        with self.lock:
            s = self.find(scale_set_id)
            unknown = [i for i in instance_ids if i not in s.instances]
            if unknown or not instance_ids:
                raise StandInError(400, "InvalidParameter", f"Instance IDs not found in scale set {s.name}: {unknown}")
            refused = 0
            for instance_id in instance_ids:
                instance = s.instances[instance_id]
                if instance.power != "deallocated":
                    continue
                if s.available is not None and s.allocated() >= s.available:
                    refused += 1
                    continue
                instance.power, instance.ready_at = "starting", time.monotonic() + self.create_delay_s
                started.append(instance)
            operation = self._operation(None if not refused else (
                s.refusal_code, f"Allocation failed for {refused} instances of scale set {s.name}."))
        for instance in started:
            self._hook(self.on_start, s, instance)
        return operation

    def operation(self, operation_id: str) -> dict[str, Any]:
        with self.lock:
            found = self.operations.get(operation_id)
        if found is None:
            raise StandInError(404, "NotFound", f"no operation {operation_id}")
        return found

    # -- internals ------------------------------------------------------------

    def _operation(self, error: tuple[str, str] | None) -> dict[str, Any]:
        operation_id = str(uuid.uuid4())
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        document: dict[str, Any] = {"name": operation_id, "startTime": now, "endTime": now,
                                    "status": "Succeeded" if error is None else "Failed"}
        if error is not None:
            document["error"] = {"code": error[0], "message": error[1]}
        self.operations[operation_id] = document
        return document

    def _instance(self, scale_set: ScaleSet, instance_id: str) -> Instance:
        instance = scale_set.instances.get(instance_id)
        if instance is None:
            raise StandInError(404, "NotFound", f"no instance {instance_id} in scale set {scale_set.name}")
        return instance

    def _provisioning(self, i: Instance) -> str:
        if i.provisioning == "Creating" and time.monotonic() >= i.ready_at:
            i.provisioning = "Succeeded"
        return i.provisioning

    def _power(self, i: Instance) -> str:
        if i.power == "starting" and time.monotonic() >= i.ready_at and i.provisioning != "Failed":
            i.power = "running"
        return i.power

    def _instance_document(self, s: ScaleSet, i: Instance) -> dict[str, Any]:
        provisioning, power = self._provisioning(i), self._power(i)
        statuses = [{"code": f"ProvisioningState/{provisioning.lower()}", "level": "Info" if provisioning != "Failed" else "Error",
                     "displayStatus": f"Provisioning {provisioning.lower()}"},
                    {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"}]
        instance_view: dict[str, Any] = {"statuses": statuses}
        if i.health:
            instance_view["vmHealth"] = {"status": {"code": f"HealthState/{i.health}", "level": "Info"}}
        return {"id": f"{s.id}/virtualMachines/{i.instance_id}", "name": i.name, "instanceId": i.instance_id,
                "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines", "location": "eastus2",
                "sku": {"name": s.sku_name, "tier": "Standard"},
                "properties": {"provisioningState": provisioning, "latestModelApplied": True,
                               "instanceView": instance_view}}

    @staticmethod
    def _hook(hook: Callable[[ScaleSet, Instance], None] | None, scale_set: ScaleSet, instance: Instance) -> None:
        if hook is not None:
            hook(scale_set, instance)
