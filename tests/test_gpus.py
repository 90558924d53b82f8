"""GPU discovery (NVML, nvidia-smi, neither) and GPU sizing, as pure logic.

The stand-in nvidia-smi is a real executable run through subprocess; NVML is
a fake module (no GPU or driver exists here), which covers its parsing and the
fall-back. tests/e2e/test_gpu_supervisor.py runs the whole service.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from nvidia_smi_standin import FIXTURES, install, query_output, uuids

from supervisor.config import ConfigError, ScalingSettings, load_supervisor_settings
from supervisor.vm import gpus as gpus_module
from supervisor.vm.gpus import Gpu, GpuToolError, discover_gpus, gpu_attributes, only_visible, parse_nvidia_smi_csv, pin_to_gpu
from supervisor.vm.sizing import Resources, compute_plan, format_plan

H100 = "NVIDIA H100 NVL"


def four_gpus() -> tuple[Gpu, ...]:
    return parse_nvidia_smi_csv(query_output(4))


def res(cpus: int = 2, memory_mb: int = 64_000) -> Resources:
    return Resources(cpus, None, cpus, memory_mb, None, ())


@pytest.fixture(autouse=True)
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever is installed here, NVML is absent unless a test provides it."""
    monkeypatch.setattr(gpus_module, "_import_nvml", lambda: None)


# --- nvidia-smi output ---------------------------------------------------------------------------


def test_parses_the_real_nvidia_smi_output() -> None:
    gpus = parse_nvidia_smi_csv((FIXTURES / "query-gpu.csv").read_text())
    assert gpus == (Gpu(0, "GPU-5b1c2d3e-aaaa-bbbb-cccc-000000000000", H100, 95830),
                    Gpu(1, "GPU-5b1c2d3e-aaaa-bbbb-cccc-000000000001", H100, 95830))
    assert gpus[1].cuda_visible_devices == "GPU-5b1c2d3e-aaaa-bbbb-cccc-000000000001"


def test_tolerates_header_and_units() -> None:
    assert parse_nvidia_smi_csv((FIXTURES / "query-gpu-units.csv").read_text()) == \
        parse_nvidia_smi_csv((FIXTURES / "query-gpu.csv").read_text())


def test_unknown_memory_and_a_comma_in_the_name() -> None:
    gpus = parse_nvidia_smi_csv("0, MIG-1234, NVIDIA A100, 1g.10gb, [N/A]\n")
    assert gpus == (Gpu(0, "MIG-1234", "NVIDIA A100, 1g.10gb", 0),)


@pytest.mark.parametrize("text", [
    "<html>502 Bad Gateway</html>\n",
    "zero, GPU-1, Tesla T4, 15360\n",
    "0, GPU-1, Tesla T4, lots\n",
    "0, GPU-1, Tesla T4, 15360\n0, GPU-2, Tesla T4, 15360\n",
    (FIXTURES / "list-gpus.txt").read_text(),  # `nvidia-smi -L`, the wrong command's output
])
def test_garbage_is_an_error(text: str) -> None:
    with pytest.raises(GpuToolError):
        parse_nvidia_smi_csv(text)


# --- discovery through the stand-in tool -----------------------------------------------------------


def test_discovery_runs_nvidia_smi_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "bin", gpus=4)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = discover_gpus()
    assert (found.source, found.warning) == ("nvidia-smi", None)
    assert [g.uuid for g in found.gpus] == uuids(4)
    assert {g.name for g in found.gpus} == {H100}


def test_no_tool_no_library_means_no_gpus_and_no_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert discover_gpus() == gpus_module.GpuDiscovery((), "none", None)


@pytest.mark.parametrize("mode, said", [("garbage", "is not 'index, uuid, name, memory'"),
                                        ("no-driver", "exit code 9: NVIDIA-SMI has failed")])
def test_failing_tool_is_one_warning_and_no_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, said: str) -> None:
    install(tmp_path / "bin", mode=mode)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = discover_gpus()
    assert found.gpus == () and found.warning is not None
    assert said in found.warning and "sizing by CPU" in found.warning
    assert "\n" not in found.warning


def test_hanging_tool_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "nvidia-smi"
    tool.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    tool.chmod(0o755)
    monkeypatch.setattr(gpus_module, "NVIDIA_SMI_TIMEOUT_S", 0.5)
    found = discover_gpus(str(tool))
    assert found.gpus == () and found.warning is not None and "no answer within 0.5s" in found.warning


# --- NVML ------------------------------------------------------------------------------------------


class FakeNvml:
    """The calls gpus.py makes, answering like nvidia-ml-py on a 2-GPU VM (older versions return bytes)."""

    def __init__(self, init_error: Exception | None = None, query_error: Exception | None = None) -> None:
        self.init_error, self.query_error = init_error, query_error
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.init_error:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if self.query_error:
            raise self.query_error
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> Any:
        return f"GPU-nvml-{handle}" if handle else b"GPU-nvml-0"

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return b"Tesla T4" if handle else "Tesla T4"

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(total=15360 * 1024 * 1024, free=0, used=0)


def test_nvml_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml()
    monkeypatch.setattr(gpus_module, "_import_nvml", lambda: nvml)
    install(tmp_path / "bin", gpus=4)  # would say 4: NVML's answer wins
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = discover_gpus()
    assert found.source == "nvml" and found.warning is None
    assert found.gpus == (Gpu(0, "GPU-nvml-0", "Tesla T4", 15360), Gpu(1, "GPU-nvml-1", "Tesla T4", 15360))
    assert nvml.shut_down, "NVML left initialised in the supervisor, which then forks"


def test_nvml_without_driver_falls_back_to_nvidia_smi_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpus_module, "_import_nvml", lambda: FakeNvml(init_error=OSError("libnvidia-ml.so.1 not found")))
    install(tmp_path / "bin", gpus=4)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = discover_gpus()
    assert (found.source, len(found.gpus), found.warning) == ("nvidia-smi", 4, None)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert discover_gpus() == gpus_module.GpuDiscovery((), "none", None)


def test_nvml_query_failure_warns_once_and_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml(query_error=RuntimeError("GPU is lost"))
    monkeypatch.setattr(gpus_module, "_import_nvml", lambda: nvml)
    monkeypatch.setenv("PATH", str(tmp_path))
    found = discover_gpus()
    assert found.gpus == () and found.warning is not None and "NVML: RuntimeError: GPU is lost" in found.warning
    assert nvml.shut_down


# --- sizing --------------------------------------------------------------------------------------


def test_one_worker_per_gpu_whatever_the_cpus() -> None:
    plan = compute_plan(ScalingSettings(), "scale-out", res(cpus=2), None, four_gpus())
    assert plan.workers == 4 and plan.gpu_per_slot
    assert [plan.gpu_for_slot(s).index for s in range(4)] == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert any("4 GPUs × 1 workers_per_gpu → 4" in r for r in plan.reasons), plan.reasons


def test_two_per_gpu_spread_evenly() -> None:
    plan = compute_plan(ScalingSettings(workers_per_gpu=2), "scale-out", res(cpus=96), None, four_gpus())
    assert plan.workers == 8
    slots = plan.to_dict()["slots"]
    assert [s["gpu"] for s in slots] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [s["cuda_visible_devices"] for s in slots] == uuids(4) * 2


def test_gpu_sizing_still_capped_by_max_workers_and_memory() -> None:
    capped = compute_plan(ScalingSettings(workers_per_gpu=2, max_workers=6), "scale-out", res(), None, four_gpus())
    assert capped.workers == 6
    assert [capped.gpu_for_slot(s).index for s in range(6)] == [0, 1, 2, 3, 0, 1]  # type: ignore[union-attr]
    assert any("as evenly as the count allows" in r for r in capped.reasons)
    memory = compute_plan(ScalingSettings(workers_per_gpu=2, memory_per_worker_mb=1000), "scale-out", res(memory_mb=3500),
                          None, four_gpus())
    assert memory.workers == 3


def test_zero_per_gpu_sizes_by_cpu_and_pins_nothing() -> None:
    plan = compute_plan(ScalingSettings(workers_per_gpu=0), "scale-out", res(cpus=3), None, four_gpus())
    assert plan.workers == 3 and not plan.gpu_per_slot and plan.gpu_for_slot(0) is None
    assert len(plan.to_dict()["gpus"]) == 4
    assert "every worker sees all 4 GPUs" in format_plan(plan)


def test_no_gpus_is_cpu_sizing_as_before() -> None:
    with_default = compute_plan(ScalingSettings(), "scale-out", res(cpus=3), None, ())
    assert with_default.workers == 3 and with_default.gpu_for_slot(0) is None
    assert not any("GPU" in r for r in with_default.reasons)


def test_explicit_workers_are_bound_round_robin() -> None:
    plan = compute_plan(ScalingSettings(workers=5), "scale-out", res(), None, four_gpus())
    assert plan.workers == 5 and [plan.gpu_for_slot(s).index for s in range(5)] == [0, 1, 2, 3, 0]  # type: ignore[union-attr]


def test_scale_up_one_process_sees_every_gpu() -> None:
    plan = compute_plan(ScalingSettings(workers_per_gpu=2, threads_per_core=4), "scale-up", res(cpus=2), None, four_gpus())
    assert (plan.workers, plan.threads, plan.gpu_per_slot) == (1, 8, False)
    assert plan.gpu_for_slot(0) is None
    assert any("sees all 4 GPUs" in r for r in plan.reasons)


def test_per_sku_override_of_workers_per_gpu() -> None:
    scaling = ScalingSettings(sku={"Standard_NC24ads_A100_v4": {"workers_per_gpu": 3}})
    plan = compute_plan(scaling, "scale-out", res(), "Standard_NC24ads_A100_v4", four_gpus()[:1])
    assert plan.workers == 3 and {plan.gpu_for_slot(s).index for s in range(3)} == {0}  # type: ignore[union-attr]
    assert "per-SKU override for Standard_NC24ads_A100_v4: workers_per_gpu=3" in plan.reasons


def test_text_plan_says_which_gpu_each_worker_gets() -> None:
    text = format_plan(compute_plan(ScalingSettings(workers_per_gpu=2), "scale-out", res(), None, four_gpus()))
    assert "GPUs:     4 GPUs (4 × NVIDIA H100 NVL, 95830 MB)" in text
    assert f"worker 5 → GPU 1 ({uuids(4)[1]})" in text
    assert "CUDA_VISIBLE_DEVICES set per worker" in text
    assert "GPUs:     no GPUs" in format_plan(compute_plan(ScalingSettings(), "scale-out", res(), None))


# --- settings and the worker side -------------------------------------------------------------------


def test_workers_per_gpu_setting(tmp_path: Path) -> None:
    assert load_supervisor_settings(None, {}, require_queue=False).scaling.workers_per_gpu == 1
    assert load_supervisor_settings(None, {"SPOT_SCALING_WORKERS_PER_GPU": "2"}, require_queue=False).scaling.workers_per_gpu == 2
    with pytest.raises(ConfigError, match=r"scaling\.workers_per_gpu.*must be 0 \(ignore GPUs\) to 64, got -1"):
        load_supervisor_settings(None, {"SPOT_SCALING_WORKERS_PER_GPU": "-1"}, require_queue=False)
    config = tmp_path / "c.toml"
    config.write_text("[scaling.sku.Standard_NC24ads_A100_v4]\nworkers_per_gpu = 100\n")
    with pytest.raises(ConfigError, match=r"scaling\.sku\.Standard_NC24ads_A100_v4\.workers_per_gpu"):
        load_supervisor_settings(config, {}, require_queue=False)


def test_pin_to_gpu_sets_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    gpu = four_gpus()[2]
    assert pin_to_gpu(gpu) == {"spot.gpu.index": "2", "spot.gpu.uuid": uuids(4)[2], "spot.gpu.name": H100}
    assert os.environ["CUDA_VISIBLE_DEVICES"] == uuids(4)[2] and "CUDA_DEVICE_ORDER" not in os.environ
    pin_to_gpu(Gpu(3, "", "x", 0))
    assert (os.environ["CUDA_VISIBLE_DEVICES"], os.environ["CUDA_DEVICE_ORDER"]) == ("3", "PCI_BUS_ID")
    assert gpu_attributes(gpu)["spot.gpu.index"] == "2"


def test_the_supervisors_own_cuda_visible_devices_limits_the_gpus() -> None:
    gpus = four_gpus()
    chosen, note = only_visible(gpus, f"3, {uuids(4)[1]}")  # an index and a UUID, as CUDA reads them
    assert [g.index for g in chosen] == [3, 1]
    assert note == f"CUDA_VISIBLE_DEVICES='3, {uuids(4)[1]}' in the supervisor's environment: 2 of 4 GPUs used"
    assert only_visible(gpus, "GPU-5b1c")[0] == ()  # a prefix of every UUID names no one GPU
    mixed = (Gpu(0, "GPU-aaaa-1", "T4", 0), Gpu(1, "GPU-bbbb-2", "T4", 0))
    assert only_visible(mixed, "GPU-bb")[0] == (mixed[1],)
    assert [g.index for g in only_visible(gpus, "2,7,0")[0]] == [2]  # CUDA stops at the first unknown entry
    assert only_visible(gpus, "")[0] == () and only_visible(gpus, "-1")[0] == ()
    plan = compute_plan(ScalingSettings(), "scale-out", res(), None, chosen, note)
    assert plan.workers == 2 and [plan.gpu_for_slot(s).index for s in range(2)] == [3, 1]  # type: ignore[union-attr]
    assert note in plan.reasons


def test_discovery_applies_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install(tmp_path / "bin", gpus=4)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    found = discover_gpus(visible="0,1")
    assert [g.index for g in found.gpus] == [0, 1] and found.note is not None and "2 of 4 GPUs used" in found.note
    assert discover_gpus().note is None
