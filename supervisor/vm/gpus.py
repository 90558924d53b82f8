"""Which NVIDIA GPUs this VM has, and pinning a worker process to one of them.

Discovery tries NVML first (the `nvidia-ml-py` package, the optional extra
`gpu`, imported only here and only when called), then `nvidia-smi` on PATH
(installed with every NVIDIA driver). No library and no tool means no GPUs,
never an error; a tool that fails or prints something we cannot read gives one
warning, and the supervisor sizes by CPU.

The supervisor never initialises CUDA: NVML is the management library, not the
CUDA runtime, and it is shut down again before any worker is forked.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

NVIDIA_SMI = "nvidia-smi"
NVIDIA_SMI_ARGS = ("--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits")
NVIDIA_SMI_TIMEOUT_S = 15.0  # a wedged driver can make nvidia-smi hang
NVIDIA_SMI_NO_DEVICES = 6  # "No devices were found": a driver without GPUs, not a failure
MIB = 1024 * 1024


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    name: str
    memory_mb: int  # 0 when the tool does not say

    @property
    def cuda_visible_devices(self) -> str:
        """The UUID: CUDA numbers devices fastest-first by default, nvidia-smi and NVML by PCI bus."""
        return self.uuid or str(self.index)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "uuid": self.uuid, "name": self.name, "memory_mb": self.memory_mb}

    def describe(self) -> str:
        return f"GPU {self.index} ({self.uuid})" if self.uuid else f"GPU {self.index}"


@dataclass(frozen=True)
class GpuDiscovery:
    gpus: tuple[Gpu, ...] = ()
    source: str = "none"  # "nvml", "nvidia-smi" or "none"
    warning: str | None = None  # one line for the operator when a tool was there but failed
    note: str | None = None  # why fewer GPUs are used than were found


class GpuToolError(Exception):
    """nvidia-smi or NVML answered with an error or with something we cannot read."""


def discover_gpus(nvidia_smi: str | None = None, visible: str | None = None) -> GpuDiscovery:
    """The GPUs of this machine, limited to `visible` (the supervisor's own CUDA_VISIBLE_DEVICES) when set.
    Never raises."""
    found = _discover(nvidia_smi)
    if visible is None or not found.gpus:
        return found
    gpus, note = only_visible(found.gpus, visible)
    return GpuDiscovery(gpus, found.source, found.warning, note)


def _discover(nvidia_smi: str | None) -> GpuDiscovery:
    problems: list[str] = []
    pynvml = _import_nvml()
    if pynvml is not None:
        try:
            gpus = gpus_from_nvml(pynvml)
            return GpuDiscovery(gpus, "nvml")
        except _NvmlUnavailable as exc:  # the package without a driver: the usual case on a CPU VM
            log.debug("NVML unavailable (%s); trying nvidia-smi", exc)
        except GpuToolError as exc:
            problems.append(f"NVML: {exc}")
    tool = nvidia_smi or shutil.which(NVIDIA_SMI)
    if tool is not None:
        try:
            return GpuDiscovery(gpus_from_nvidia_smi(tool), "nvidia-smi", _warning(problems))
        except GpuToolError as exc:
            problems.append(f"{NVIDIA_SMI}: {exc}")
    return GpuDiscovery((), "none", _warning(problems))


def only_visible(gpus: Sequence[Gpu], visible: str) -> tuple[tuple[Gpu, ...], str]:
    """The GPUs an operator left visible to the service (indices, UUIDs or UUID prefixes, as CUDA reads them:
    up to the first entry that names no GPU), so workers are never pinned to a GPU it kept for something else."""
    chosen: list[Gpu] = []
    for entry in (e.strip() for e in visible.split(",")):
        matches = [g for g in gpus if entry and (entry == str(g.index) or (g.uuid and g.uuid.startswith(entry)))]
        if len(matches) != 1:  # nothing, or an ambiguous UUID prefix
            break
        gpu = matches[0]
        if gpu not in chosen:
            chosen.append(gpu)
    return tuple(chosen), f"CUDA_VISIBLE_DEVICES={visible!r} in the supervisor's environment: {len(chosen)} of {len(gpus)} GPUs used"


def _warning(problems: Sequence[str]) -> str | None:
    if not problems:
        return None
    return "GPU discovery failed (" + "; ".join(problems) + "): sizing by CPU, workers not pinned to GPUs"


# --- NVML ------------------------------------------------------------------------------------------


class _NvmlUnavailable(Exception):
    pass


def _import_nvml() -> ModuleType | None:
    try:
        import pynvml  # nvidia-ml-py: pip install 'spot-supervisor[gpu]'
    except ImportError:
        return None
    return pynvml


def gpus_from_nvml(pynvml: Any) -> tuple[Gpu, ...]:
    """Raises _NvmlUnavailable when the library or driver does not load, GpuToolError on a failed query."""
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        raise _NvmlUnavailable(f"{type(exc).__name__}: {exc}") from None
    try:
        gpus = []
        for index in range(int(pynvml.nvmlDeviceGetCount())):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(index, _text(pynvml.nvmlDeviceGetUUID(handle)), _text(pynvml.nvmlDeviceGetName(handle)),
                            int(memory.total) // MIB))
        return tuple(gpus)
    except Exception as exc:
        raise GpuToolError(f"{type(exc).__name__}: {exc}") from None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # nothing useful to do about it; no worker uses NVML through us
            log.debug("nvmlShutdown failed", exc_info=True)


def _text(value: str | bytes) -> str:
    """Older nvidia-ml-py versions return bytes."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# --- nvidia-smi ------------------------------------------------------------------------------------


def gpus_from_nvidia_smi(tool: str) -> tuple[Gpu, ...]:
    try:
        done = subprocess.run([tool, *NVIDIA_SMI_ARGS], capture_output=True, text=True, errors="replace",
                              timeout=NVIDIA_SMI_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise GpuToolError(f"no answer within {NVIDIA_SMI_TIMEOUT_S:g}s") from None
    except OSError as exc:
        raise GpuToolError(f"cannot run {tool}: {exc.strerror or exc}") from None
    if done.returncode == NVIDIA_SMI_NO_DEVICES:
        return ()
    if done.returncode != 0:
        said = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise GpuToolError(f"exit code {done.returncode}" + (f": {said[0][:200]}" if said else ""))
    return parse_nvidia_smi_csv(done.stdout)


def parse_nvidia_smi_csv(text: str) -> tuple[Gpu, ...]:
    """`index, uuid, name, memory.total` lines (noheader, nounits); a header line or MiB units are tolerated."""
    gpus: list[Gpu] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or (number == 1 and line.lstrip().lower().startswith("index,")):
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 4:
            raise GpuToolError(f"line {number} is not 'index, uuid, name, memory': {line[:80]!r}")
        index_text, uuid, memory_text = fields[0], fields[1], fields[-1]
        name = ", ".join(fields[2:-1])  # a name with a comma in it
        memory_text = memory_text.removesuffix("MiB").strip()
        try:
            index = int(index_text)
            memory_mb = 0 if memory_text in ("[N/A]", "N/A") else int(memory_text)
        except ValueError:
            raise GpuToolError(f"line {number} is not 'index, uuid, name, memory': {line[:80]!r}") from None
        if index < 0 or memory_mb < 0 or not uuid or not name:
            raise GpuToolError(f"line {number} is not 'index, uuid, name, memory': {line[:80]!r}")
        gpus.append(Gpu(index, uuid, name, memory_mb))
    if len({g.index for g in gpus}) != len(gpus):
        raise GpuToolError("the same GPU index appears twice")
    return tuple(sorted(gpus, key=lambda g: g.index))


# --- in a worker process -----------------------------------------------------------------------------


def pin_to_gpu(gpu: Gpu) -> dict[str, str]:
    """In a freshly forked worker, before its handler is imported: this process sees `gpu` only.

    Returns the telemetry attributes that name the GPU."""
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu.cuda_visible_devices
    if not gpu.uuid:  # an index: make CUDA count the way nvidia-smi does
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    return gpu_attributes(gpu)


def gpu_attributes(gpu: Gpu) -> dict[str, str]:
    return {"spot.gpu.index": str(gpu.index), "spot.gpu.uuid": gpu.uuid, "spot.gpu.name": gpu.name}


def describe_gpus(gpus: Sequence[Gpu]) -> str:
    """'4 GPUs (4 × NVIDIA H100 NVL, 95830 MB)'."""
    if not gpus:
        return "no GPUs"
    kinds: dict[tuple[str, int], int] = {}
    for gpu in gpus:
        kinds[(gpu.name, gpu.memory_mb)] = kinds.get((gpu.name, gpu.memory_mb), 0) + 1
    parts = [f"{count} × {name}" + (f", {memory} MB" if memory else "") for (name, memory), count in kinds.items()]
    return f"{len(gpus)} GPU{'s' if len(gpus) != 1 else ''} ({'; '.join(parts)})"
