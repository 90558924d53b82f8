"""The supervisor's settings: the worker's sections plus scaling, events and startup.

`SupervisorSettings` extends the worker's `Settings`, so one file configures both
and the forked workers receive it as is. Loading goes through the one generic
loader in worker/settings.py (TOML, SPOT_<SECTION>_<KEY>, one-line errors).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from supervisor.fleet.settings import FleetSettings, validate_fleet
from supervisor.ops.prices import DEFAULT_PRICES_ENDPOINT
from worker.settings import (
    DAY_S,
    HOUR_S,
    ConfigError,
    Settings,
    build_settings,
    coerce,
    http_url_problem,
    require,
    require_between,
    unknown_env_variables,
    validate,
)

__all__ = ["ConfigError", "SupervisorSettings", "load_supervisor_settings", "unknown_env_variables"]

DEFAULT_DRAIN_ON = ("Preempt", "Terminate", "Reboot", "Redeploy")
EVENT_SOURCES = ("auto", "azure", "aws", "gcp", "none")
EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")
MAX_PER_CORE = 1024
MAX_WORKERS_PER_GPU = 64
MAX_WORKERS = 1024  # worker processes on one VM, whatever the settings: each is a process with its own queue client


@dataclass(frozen=True)
class ScalingSettings:
    workers_per_core: float = 1.0
    threads_per_core: int = 4
    workers: int = 0
    min_workers: int = 1
    max_workers: int = 64
    memory_per_worker_mb: int = 256
    workers_per_gpu: int = 1
    respawn_delay_max_s: float = 30.0
    worker_timeout_s: float = 20.0
    sku: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# The [scaling] keys a [scaling.sku.<vmSize>] table may override.
SKU_OVERRIDE_KEYS = frozenset(f.name for f in dataclasses.fields(ScalingSettings)) - {"sku"}


@dataclass(frozen=True)
class EventsSettings:
    source: str = "auto"
    endpoint: str = ""  # "" = the chosen source's own address (supervisor/vm/platform.py)
    poll_interval_s: float = 1.0
    request_timeout_s: float = 5.0
    drain_on: tuple[str, ...] = DEFAULT_DRAIN_ON
    safety_margin_s: float = 5.0
    started_deadline_s: float = 5.0
    ack: str = "sole"
    vm_name: str = ""
    dmi_dir: str = "/sys/class/dmi/id"
    on_rebalance: str = "ignore"


@dataclass(frozen=True)
class StartupSettings:
    wait_for_provisioning: bool = False
    arm_endpoint: str = "https://management.azure.com"
    provisioning_timeout_s: float = 900.0


@dataclass(frozen=True)
class CostSettings:
    enabled: bool = True
    prices_endpoint: str = DEFAULT_PRICES_ENDPOINT


@dataclass(frozen=True)
class SupervisorSettings(Settings):
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    startup: StartupSettings = field(default_factory=StartupSettings)
    cost: CostSettings = field(default_factory=CostSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)


def load_supervisor_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                             require_queue: bool = True) -> SupervisorSettings:
    """Read the TOML file (if any), apply environment overrides, validate every section.

    require_queue=False is for commands that never touch the queue (`plan`)."""
    settings = build_settings(SupervisorSettings, path, environ)
    validate_supervisor(settings, require_queue)
    return settings


def validate_supervisor(s: SupervisorSettings, require_queue: bool = True) -> None:
    validate(s, require_queue)
    _validate_scaling("scaling", dataclasses.asdict(s.scaling))
    hints = typing.get_type_hints(ScalingSettings)
    for vm_size, overrides in s.scaling.sku.items():
        require(isinstance(overrides, dict), f"scaling.sku.{vm_size}", "must be a table of scaling keys")
        for key, value in overrides.items():
            require(key in SKU_OVERRIDE_KEYS, f"scaling.sku.{vm_size}.{key}",
                    f"unknown key; allowed: {', '.join(sorted(SKU_OVERRIDE_KEYS))}")
            coerce(f"scaling.sku.{vm_size}.{key}", hints[key], value)
        _validate_scaling(f"scaling.sku.{vm_size}", {**dataclasses.asdict(s.scaling), **overrides})

    e = s.events
    require(e.source in EVENT_SOURCES, "events.source", f"must be one of: {', '.join(EVENT_SOURCES)}; got {e.source!r}")
    if e.endpoint:  # empty: the chosen source's own address
        _require_url(e.endpoint, "events.endpoint", "http://169.254.169.254")
    require(e.on_rebalance in ("ignore", "drain"), "events.on_rebalance", f"must be ignore or drain; got {e.on_rebalance!r}")
    require(bool(e.dmi_dir), "events.dmi_dir", "must be a directory such as /sys/class/dmi/id")
    require_between(e.poll_interval_s, "events.poll_interval_s", 0, 60, low_inclusive=False,
                    note=" (a notice gives 30 s: poll well within it)")
    require_between(e.request_timeout_s, "events.request_timeout_s", 0, 300, low_inclusive=False)
    # An empty list, or a blank name that no event ever lists, would switch eviction handling off in silence.
    require(bool(e.drain_on), "events.drain_on", f"must name at least one event type (an empty list would never drain "
            f"on a notice; to ignore notices set events.source = \"none\"); allowed: {', '.join(EVENT_TYPES)}")
    for event_type in e.drain_on:
        require(event_type in EVENT_TYPES, "events.drain_on", f"unknown event type {event_type!r}; allowed: {', '.join(EVENT_TYPES)}")
    require(e.vm_name == e.vm_name.strip(), "events.vm_name",
            f"must be this VM's name exactly as Scheduled Events lists it, without surrounding blanks, or empty for "
            f"instance metadata's compute.name; got {e.vm_name!r}")
    require_between(e.safety_margin_s, "events.safety_margin_s", 0, HOUR_S)
    require_between(e.started_deadline_s, "events.started_deadline_s", 0, HOUR_S, low_inclusive=False)
    require(e.ack in ("sole", "always", "never"), "events.ack", f"must be one of: sole, always, never; got {e.ack!r}")

    _require_url(s.startup.arm_endpoint, "startup.arm_endpoint", "https://management.azure.com")
    _require_url(s.cost.prices_endpoint, "cost.prices_endpoint", DEFAULT_PRICES_ENDPOINT)
    require_between(s.startup.provisioning_timeout_s, "startup.provisioning_timeout_s", 0, DAY_S, low_inclusive=False)
    validate_fleet(s.fleet)


def _require_url(url: str, key: str, example: str) -> None:
    problem = http_url_problem(url)
    require(problem is None, key, f"must be an http(s) URL with a host, such as {example} ({problem}), got {url!r}")


def _validate_scaling(prefix: str, sc: Mapping[str, Any]) -> None:
    require_between(sc["workers_per_core"], f"{prefix}.workers_per_core", 0, MAX_PER_CORE, low_inclusive=False)
    require_between(sc["threads_per_core"], f"{prefix}.threads_per_core", 1, MAX_PER_CORE)
    require_between(sc["respawn_delay_max_s"], f"{prefix}.respawn_delay_max_s", 0, HOUR_S)
    require(sc["min_workers"] >= 1, f"{prefix}.min_workers", f"must be at least 1, got {sc['min_workers']}")
    require(sc["min_workers"] <= sc["max_workers"] <= MAX_WORKERS, f"{prefix}.max_workers",
            f"must be between min_workers ({sc['min_workers']}) and {MAX_WORKERS}, got {sc['max_workers']}")
    # An explicit count wins over the sizing rules (per core, per GPU, min_workers, the memory estimate), not
    # over max_workers: that is the ceiling the operator set for this VM, and a typo (40000) must not fork 40000.
    require(0 <= sc["workers"] <= sc["max_workers"], f"{prefix}.workers",
            f"must be 0 (size to the VM) to max_workers ({sc['max_workers']}), got {sc['workers']}")
    require(2 <= sc["worker_timeout_s"] <= 3600, f"{prefix}.worker_timeout_s",
            f"must be between 2 and 3600 (workers report every second), got {sc['worker_timeout_s']}")
    require(sc["memory_per_worker_mb"] >= 0, f"{prefix}.memory_per_worker_mb",
            f"must be 0 (no memory limit) or more, got {sc['memory_per_worker_mb']}")
    require(0 <= sc["workers_per_gpu"] <= MAX_WORKERS_PER_GPU, f"{prefix}.workers_per_gpu",
            f"must be 0 (ignore GPUs) to {MAX_WORKERS_PER_GPU}, got {sc['workers_per_gpu']}")
