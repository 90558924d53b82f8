"""The `[fleet]` section: the keeper's settings, and `retire_when_idle_s`, which each VM's supervisor reads.

Part of `SupervisorSettings` (one file configures the keeper and the VMs). This module imports nothing
from Azure: the per-VM service loads it on every start.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.settings import DAY_S, ConfigError, http_url_problem, require, require_between

TARGETS = ("queue", "fixed", "tag")
ON_DEALLOCATED = ("restart", "replace")
MAX_VMS = 10_000  # far above any one fleet; bounds every sum and every ARM request built from it
SCALE_SET_ID = re.compile(
    r"^/subscriptions/[^/\s]+/resourceGroups/[^/\s]+/providers/Microsoft\.Compute/virtualMachineScaleSets/[^/\s]+$",
    re.IGNORECASE)


@dataclass(frozen=True)
class FleetSettings:
    scale_sets: tuple[str, ...] = ()
    target: str = "queue"
    messages_per_vm: int = 10
    vms: int = 0
    min_vms: int = 0
    max_vms: int = 10
    interval_s: float = 30.0
    on_deallocated: str = "restart"
    arm_endpoint: str = "https://management.azure.com"
    client_id: str = ""
    retire_when_idle_s: float = 0.0
    allocation_cooldown_s: float = 60.0
    allocation_cooldown_max_s: float = 900.0
    request_timeout_s: float = 30.0


def validate_fleet(f: FleetSettings, require_scale_sets: bool = False) -> None:
    """Every key's value; require_scale_sets for the keeper's own commands (a VM needs none)."""
    require(bool(f.scale_sets) or not require_scale_sets, "fleet.scale_sets",
            "required: a list of scale-set resource IDs in preference order, "
            "/subscriptions/<id>/resourceGroups/<rg>/providers/Microsoft.Compute/virtualMachineScaleSets/<name>")
    seen: set[str] = set()
    for scale_set in f.scale_sets:
        require(bool(SCALE_SET_ID.match(scale_set)), "fleet.scale_sets",
                f"not a scale-set resource ID (/subscriptions/<id>/resourceGroups/<rg>/providers/"
                f"Microsoft.Compute/virtualMachineScaleSets/<name>): {scale_set[:300]!r}")
        require(scale_set.lower() not in seen, "fleet.scale_sets", f"listed twice: {scale_set!r}")
        seen.add(scale_set.lower())
    require(f.target in TARGETS, "fleet.target", f"must be one of: {', '.join(TARGETS)}; got {f.target!r}")
    require(1 <= f.messages_per_vm <= 1_000_000, "fleet.messages_per_vm",
            f"must be between 1 and 1000000, got {f.messages_per_vm}")
    require(0 <= f.vms <= MAX_VMS, "fleet.vms", f"must be between 0 and {MAX_VMS}, got {f.vms}")
    require(0 <= f.min_vms <= MAX_VMS, "fleet.min_vms", f"must be between 0 and {MAX_VMS}, got {f.min_vms}")
    require(f.min_vms <= f.max_vms <= MAX_VMS, "fleet.max_vms",
            f"must be between min_vms ({f.min_vms}) and {MAX_VMS}, got {f.max_vms}")
    require_between(f.interval_s, "fleet.interval_s", 0, DAY_S, low_inclusive=False)
    require(f.on_deallocated in ON_DEALLOCATED, "fleet.on_deallocated",
            f"must be one of: {', '.join(ON_DEALLOCATED)}; got {f.on_deallocated!r}")
    problem = http_url_problem(f.arm_endpoint)
    require(f.arm_endpoint.startswith("https://") and problem is None, "fleet.arm_endpoint",
            f"must be an https URL with a host (a bearer token never travels over plain HTTP)"
            f"{f' ({problem})' if problem else ''}, got {f.arm_endpoint!r}")
    require(not f.client_id or bool(re.fullmatch(r"[0-9a-fA-F-]{36}", f.client_id)), "fleet.client_id",
            f"must be a managed identity's client ID (a GUID) or empty, got {f.client_id!r}")
    require_between(f.retire_when_idle_s, "fleet.retire_when_idle_s", 0, DAY_S, note=" (0 = never retire)")
    require_between(f.allocation_cooldown_s, "fleet.allocation_cooldown_s", 0, DAY_S, low_inclusive=False)
    require_between(f.allocation_cooldown_max_s, "fleet.allocation_cooldown_max_s", f.allocation_cooldown_s, DAY_S,
                    note=" (at least allocation_cooldown_s)")
    require_between(f.request_timeout_s, "fleet.request_timeout_s", 0, 600, low_inclusive=False)


__all__ = ["ConfigError", "FleetSettings", "validate_fleet"]
