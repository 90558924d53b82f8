"""Size the worker pool to what this process may really use.

`read_resources` looks at CPU affinity, cgroup (v1 or v2) CPU quota and memory
limit, and psutil's available memory; `compute_plan` turns that, the GPUs found
(supervisor/vm/gpus.py) and the `[scaling]` settings into a number of workers and
threads, and the GPU each worker slot is bound to, with the reasons an operator
sees in `spot-supervisor plan`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from supervisor.config import ScalingSettings
from supervisor.vm.gpus import Gpu, describe_gpus

DEFAULT_CGROUP_ROOT = Path("/sys/fs/cgroup")
DEFAULT_PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT_ENV = "SPOT_CGROUP_ROOT"
PROC_SELF_CGROUP_ENV = "SPOT_PROC_SELF_CGROUP"

# cgroup v1 reports "no limit" as a huge page-rounded number (e.g. 9223372036854771712).
UNLIMITED_BYTES = 1 << 60
MB = 1024 * 1024

# Where a v1 hierarchy holding the cpu controller is usually mounted under the root.
_V1_CPU_DIRS = ("cpu,cpuacct", "cpuacct,cpu", "cpu")
# A hybrid system mounts the v2 hierarchy at <root>/unified.
_V2_DIRS = ("", "unified")


@dataclass(frozen=True)
class Resources:
    affinity_cpus: int
    cgroup_cpu_quota: float | None
    usable_cpus: int
    available_memory_mb: int
    cgroup_memory_limit_mb: int | None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class Plan:
    mode: str
    workers: int
    threads: int
    usable_cpus: int
    available_memory_mb: int
    vm_size: str | None
    reasons: tuple[str, ...] = ()
    gpus: tuple[Gpu, ...] = ()
    gpu_per_slot: bool = False  # each worker slot bound to one GPU; else every worker sees every GPU

    def gpu_for_slot(self, slot: int) -> Gpu | None:
        """Round robin, so k per GPU at gpus × k workers, and as even as it gets under a cap or after TTIN."""
        if not self.gpu_per_slot or not self.gpus:
            return None
        return self.gpus[slot % len(self.gpus)]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["reasons"] = list(self.reasons)
        data["gpus"] = [gpu.to_dict() for gpu in self.gpus]
        data["slots"] = [self._slot_dict(slot) for slot in range(self.workers)]
        return data

    def _slot_dict(self, slot: int) -> dict[str, Any]:
        gpu = self.gpu_for_slot(slot)
        if gpu is None:
            return {"slot": slot, "gpu": None, "cuda_visible_devices": None}
        return {"slot": slot, "gpu": gpu.index, "cuda_visible_devices": gpu.cuda_visible_devices}


# --- resources -----------------------------------------------------------------------------------


def read_resources(cgroup_root: Path | None = None, proc_self_cgroup: Path | None = None) -> Resources:
    """What this process may use. Never raises on a missing or odd cgroup file."""
    root = cgroup_root or Path(os.environ.get(CGROUP_ROOT_ENV) or DEFAULT_CGROUP_ROOT)
    proc_file = proc_self_cgroup or Path(os.environ.get(PROC_SELF_CGROUP_ENV) or DEFAULT_PROC_SELF_CGROUP)
    notes: list[str] = []

    affinity = _affinity_cpus(notes)
    v2_path, v1_paths = _parse_proc_cgroup(proc_file, notes)

    quota = _cpu_quota(root, v2_path, v1_paths, notes)
    usable = affinity if quota is None else max(1, min(affinity, math.ceil(quota)))

    available = psutil.virtual_memory().available // MB
    limit_mb: int | None = None
    headroom = _memory_headroom(root, v2_path, v1_paths, notes)
    if headroom is not None:
        limit_bytes, free_bytes = headroom
        limit_mb = limit_bytes // MB
        available = min(available, max(0, free_bytes) // MB)

    return Resources(affinity, quota, usable, int(available), limit_mb, tuple(dict.fromkeys(notes)))


def _affinity_cpus(notes: list[str]) -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError) as exc:  # not Linux
        notes.append(f"CPU affinity unavailable ({exc.__class__.__name__}); using os.cpu_count()")
        return os.cpu_count() or 1


def _parse_proc_cgroup(path: Path, notes: list[str]) -> tuple[str | None, dict[str, str]]:
    """The v2 cgroup path (line "0::/path") and v1 paths by controller."""
    try:
        text = path.read_text()
    except OSError as exc:
        notes.append(f"cannot read {path} ({exc.strerror or exc}); looking at the cgroup root only")
        return "/", {"cpu": "/", "memory": "/"}
    v2: str | None = None
    v1: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, cgroup_path = parts
        if hierarchy == "0" and controllers == "":
            v2 = cgroup_path
        else:
            for controller in controllers.split(","):
                v1[controller] = cgroup_path
    return v2, v1


def _cgroup_dirs(mount: Path, cgroup_path: str, notes: list[str]) -> Iterator[Path]:
    """The process's cgroup dir under `mount`, then each ancestor up to `mount` itself."""
    parts = [p for p in cgroup_path.split("/") if p]
    if ".." in parts:
        # Outside our cgroup namespace: the path is not reachable from here.
        notes.append(f"cgroup path {cgroup_path!r} is outside this namespace; using {mount} only")
        parts = []
    for depth in range(len(parts), -1, -1):
        yield mount.joinpath(*parts[:depth])


def _read_value(path: Path, notes: list[str]) -> str | None:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        notes.append(f"cannot read {path} ({exc.strerror or exc}); no limit taken from it")
        return None


def _v1_mounts(root: Path, names: tuple[str, ...]) -> list[Path]:
    seen: set[Path] = set()
    mounts = []
    for name in names:
        mount = root / name
        try:
            key = mount.resolve()
        except OSError:
            continue
        if mount.is_dir() and key not in seen:  # "cpu" is often a symlink to "cpu,cpuacct"
            seen.add(key)
            mounts.append(mount)
    return mounts


def _cpu_quota(root: Path, v2_path: str | None, v1_paths: dict[str, str], notes: list[str]) -> float | None:
    """The tightest CPU quota (in CPUs) on our cgroup or any ancestor, or None."""
    found: list[tuple[str, str | None]] = []  # (where, "quota period") for each candidate file
    if v2_path is not None:
        for sub in _V2_DIRS:
            for d in _cgroup_dirs(root / sub if sub else root, v2_path, notes):
                found.append((str(d / "cpu.max"), _read_value(d / "cpu.max", notes)))
    if "cpu" in v1_paths:
        for mount in _v1_mounts(root, _V1_CPU_DIRS):
            for d in _cgroup_dirs(mount, v1_paths["cpu"], notes):
                quota_text = _read_value(d / "cpu.cfs_quota_us", notes)
                period_text = _read_value(d / "cpu.cfs_period_us", notes)
                both = f"{quota_text} {period_text}" if quota_text is not None and period_text is not None else None
                found.append((str(d / "cpu.cfs_quota_us"), both))
    quotas: list[tuple[float, str]] = []
    for where, text in found:
        if text is None:
            continue
        try:
            quota = _parse_cpu_max(text)
        except ValueError:
            notes.append(f"{where}: cannot parse {text!r}; ignored")
            continue
        if quota is not None:
            quotas.append((quota, where))
    if not quotas:
        notes.append(f"no cgroup CPU quota found under {root}")
        return None
    quota, source = min(quotas)
    notes.append(f"cgroup CPU quota {quota:g} from {source}")
    return quota


def _parse_cpu_max(text: str) -> float | None:
    """ "150000 100000" -> 1.5; "max 100000" or a v1 quota of -1 -> None; garbage -> ValueError."""
    fields = text.split()
    if fields and fields[0] == "max":
        return None
    if len(fields) != 2:
        raise ValueError(text)
    quota, period = int(fields[0]), int(fields[1])
    if quota < 0:
        return None
    if quota == 0 or period <= 0:
        raise ValueError(text)
    return quota / period


def _memory_headroom(root: Path, v2_path: str | None, v1_paths: dict[str, str],
                     notes: list[str]) -> tuple[int, int] | None:
    """(limit, limit - usage) in bytes at the cgroup level with the least headroom, or None."""
    found: list[tuple[int, int, Path]] = []  # (headroom, limit, where)
    candidates: list[tuple[Path, str, str]] = []
    if v2_path is not None:
        for sub in _V2_DIRS:
            candidates += [(d, "memory.max", "memory.current")
                           for d in _cgroup_dirs(root / sub if sub else root, v2_path, notes)]
    if "memory" in v1_paths:
        for mount in _v1_mounts(root, ("memory",)):
            candidates += [(d, "memory.limit_in_bytes", "memory.usage_in_bytes")
                           for d in _cgroup_dirs(mount, v1_paths["memory"], notes)]
    for d, limit_name, usage_name in candidates:
        limit_text = _read_value(d / limit_name, notes)
        if limit_text is None or limit_text == "max":
            continue
        try:
            limit = int(limit_text)
        except ValueError:
            notes.append(f"{d / limit_name}: cannot parse {limit_text!r}; ignored")
            continue
        if limit >= UNLIMITED_BYTES or limit <= 0:
            continue
        usage_text = _read_value(d / usage_name, notes)
        try:
            usage = int(usage_text or "")
        except ValueError:
            usage = 0
            notes.append(f"{d / usage_name} missing or unparseable; assuming nothing used under the limit")
        found.append((limit - usage, limit, d))
    if not found:
        notes.append(f"no cgroup memory limit found under {root}")
        return None
    free, limit, where = min(found)
    notes.append(f"cgroup memory limit {limit // MB} MB, {max(0, free) // MB} MB free, at {where}")
    return limit, free


# --- plan ----------------------------------------------------------------------------------------


def compute_plan(scaling: ScalingSettings, mode: str, resources: Resources, vm_size: str | None,
                 gpus: tuple[Gpu, ...] = (), gpu_note: str | None = None) -> Plan:
    """How many workers and threads to run, which GPU each worker gets, and why."""
    reasons: list[str] = [_describe_cpus(resources)]
    scaling = _apply_sku_overrides(scaling, vm_size, reasons)
    cpus = resources.usable_cpus
    if gpus:
        reasons.append(f"{describe_gpus(gpus)} found")
    if gpu_note:
        reasons.append(gpu_note)

    if mode == "scale-up":
        if scaling.workers > 0:
            reasons.append(f"workers = {scaling.workers} ignored in scale-up mode (always 1 worker process)")
        threads = max(1, scaling.threads_per_core * cpus)
        reasons.append(f"scale-up: 1 worker, {scaling.threads_per_core} threads_per_core × {cpus} CPUs → {threads} threads")
        if gpus:
            reasons.append(f"scale-up: the one worker sees all {len(gpus)} GPUs")
        return _plan(mode, 1, threads, resources, vm_size, reasons, gpus, False)
    if mode != "scale-out":
        raise ValueError(f"unknown workload mode {mode!r}; allowed: scale-out, scale-up")

    per_gpu = bool(gpus) and scaling.workers_per_gpu > 0
    if gpus and not per_gpu:
        reasons.append("workers_per_gpu = 0: sizing by CPU, every worker sees every GPU")

    if scaling.workers > 0:
        workers = scaling.workers
        reasons.append(f"explicit workers = {workers} (wins over workers_per_core, workers_per_gpu, min_workers and memory "
                       "sizing; settings keep it within max_workers)")
        mem_cap = _memory_cap(scaling, resources)
        if mem_cap is not None and workers > mem_cap:
            reasons.append(f"warning: memory would allow only {mem_cap} ({resources.available_memory_mb} MB / "
                           f"{scaling.memory_per_worker_mb} MB per worker)")
        if per_gpu:
            reasons.append(f"each worker slot bound to one GPU, round robin over {len(gpus)} GPUs")
        return _plan(mode, workers, 1, resources, vm_size, reasons, gpus, per_gpu)

    if per_gpu:
        workers = len(gpus) * scaling.workers_per_gpu
        reasons.append(f"{len(gpus)} GPUs × {scaling.workers_per_gpu} workers_per_gpu → {workers} "
                       f"(not capped by CPUs: a GPU worker mostly waits on its GPU)")
    else:
        # The epsilon keeps e.g. 3 × (1/3) from flooring to 0 through float error.
        workers = max(1, math.floor(cpus * scaling.workers_per_core + 1e-9))
        reasons.append(f"×{scaling.workers_per_core} workers_per_core → {workers}")
    if workers < scaling.min_workers:
        workers = scaling.min_workers
        reasons.append(f"raised to min_workers → {workers}")
    if workers > scaling.max_workers:
        workers = scaling.max_workers
        reasons.append(f"capped at max_workers → {workers}")
    mem_cap = _memory_cap(scaling, resources)
    if mem_cap is not None and workers > mem_cap:
        workers = max(1, mem_cap)
        floor_note = " (never below 1)" if mem_cap < 1 else ""
        reasons.append(f"capped by memory: {resources.available_memory_mb} MB / {scaling.memory_per_worker_mb} MB "
                       f"per worker → {workers}{floor_note}")
    if per_gpu:
        spread = "evenly" if workers % len(gpus) == 0 else "as evenly as the count allows"
        reasons.append(f"each worker slot bound to one GPU ({spread}: slot i → GPU i mod {len(gpus)}), "
                       f"CUDA_VISIBLE_DEVICES set per worker")
    return _plan(mode, workers, 1, resources, vm_size, reasons, gpus, per_gpu)


def _plan(mode: str, workers: int, threads: int, resources: Resources, vm_size: str | None,
          reasons: list[str], gpus: tuple[Gpu, ...] = (), gpu_per_slot: bool = False) -> Plan:
    return Plan(mode, workers, threads, resources.usable_cpus, resources.available_memory_mb, vm_size, tuple(reasons),
                gpus, gpu_per_slot)


def _describe_cpus(r: Resources) -> str:
    quota = f"cgroup quota {r.cgroup_cpu_quota}" if r.cgroup_cpu_quota is not None else "no cgroup quota"
    return f"{r.usable_cpus} usable CPUs (affinity {r.affinity_cpus}, {quota})"


def _memory_cap(scaling: ScalingSettings, resources: Resources) -> int | None:
    if scaling.memory_per_worker_mb <= 0:
        return None
    return resources.available_memory_mb // scaling.memory_per_worker_mb


def _apply_sku_overrides(scaling: ScalingSettings, vm_size: str | None, reasons: list[str]) -> ScalingSettings:
    if not vm_size or not scaling.sku:
        return scaling
    overrides = scaling.sku.get(vm_size)
    if overrides is None:
        # Azure spells sizes consistently, people writing TOML may not.
        overrides = next((v for k, v in scaling.sku.items() if k.lower() == vm_size.lower()), None)
    if not overrides:
        return scaling
    # Validated with the settings (SKU_OVERRIDE_KEYS): every key here is a [scaling] key.
    scaling = dataclasses.replace(scaling, **overrides)
    described = ", ".join(f"{k}={v}" for k, v in overrides.items())
    reasons.append(f"per-SKU override for {vm_size}: {described}")
    return scaling


def format_plan(plan: Plan) -> str:
    """The human text printed by `spot-supervisor plan`."""
    per = "thread" if plan.threads == 1 else "threads"
    lines = [
        f"mode:     {plan.mode}",
        f"workers:  {plan.workers}",
        f"threads:  {plan.threads} {per} per worker",
        f"CPUs:     {plan.usable_cpus} usable",
        f"memory:   {plan.available_memory_mb} MB available",
        f"GPUs:     {describe_gpus(plan.gpus)}",
        f"vmSize:   {plan.vm_size or 'unknown'}",
    ]
    if plan.gpus:
        lines.append("slots:")
        if plan.gpu_per_slot:
            lines += [f"  - worker {slot} → {gpu.describe()}" for slot in range(plan.workers)
                      if (gpu := plan.gpu_for_slot(slot)) is not None]
        else:
            lines.append(f"  - every worker sees all {len(plan.gpus)} GPUs")
    lines += ["why:", *(f"  - {reason}" for reason in plan.reasons)]
    return "\n".join(lines)
