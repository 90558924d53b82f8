from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from supervisor.config import ScalingSettings
from supervisor.vm import sizing
from supervisor.vm.sizing import Plan, Resources, compute_plan, format_plan, read_resources

REPO = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content + "\n")


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8-CPU host with 16 GiB available, whatever this machine is."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(sizing.psutil, "virtual_memory", lambda: SimpleNamespace(available=16 * GIB))


def proc_cgroup(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proc-self-cgroup"
    path.write_text(text)
    return path


# --- read_resources: cgroup v2 -------------------------------------------------------------------


def test_v2_fractional_quota_rounds_up(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"app.slice/svc.service/cpu.max": "150000 100000"})
    r = read_resources(root, proc_cgroup(tmp_path, "0::/app.slice/svc.service\n"))
    assert r.affinity_cpus == 8
    assert r.cgroup_cpu_quota == 1.5
    assert r.usable_cpus == 2
    assert r.cgroup_memory_limit_mb is None
    assert r.available_memory_mb == 16 * 1024


def test_v2_max_means_no_limit(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"svc/cpu.max": "max 100000", "svc/memory.max": "max", "svc/memory.current": "123"})
    r = read_resources(root, proc_cgroup(tmp_path, "0::/svc\n"))
    assert r.cgroup_cpu_quota is None
    assert r.usable_cpus == 8
    assert r.cgroup_memory_limit_mb is None


def test_v2_tightest_ancestor_quota_wins(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {
        "a/cpu.max": "400000 100000",
        "a/b/cpu.max": "300000 100000",
        "a/b/c/cpu.max": "max 100000",
        "a/b/c/d/cpu.max": "max 100000",
    })
    r = read_resources(root, proc_cgroup(tmp_path, "0::/a/b/c/d\n"))
    assert r.cgroup_cpu_quota == 3.0
    assert r.usable_cpus == 3
    assert any("a/b/cpu.max" in note for note in r.notes)


def test_v2_quota_below_one_cpu_still_gives_one(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"svc/cpu.max": "10000 100000"})
    r = read_resources(root, proc_cgroup(tmp_path, "0::/svc\n"))
    assert r.cgroup_cpu_quota == pytest.approx(0.1)
    assert r.usable_cpus == 1


def test_v2_memory_headroom_caps_available(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {
        "svc/memory.max": str(4 * GIB),
        "svc/memory.current": str(1 * GIB),
        # a looser limit higher up does not matter
        "memory.max": str(8 * GIB),
        "memory.current": str(1 * GIB),
    })
    r = read_resources(root, proc_cgroup(tmp_path, "0::/svc\n"))
    assert r.cgroup_memory_limit_mb == 4096
    assert r.available_memory_mb == 3072


def test_v2_memory_over_limit_gives_zero(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"svc/memory.max": str(GIB), "svc/memory.current": str(2 * GIB)})
    r = read_resources(root, proc_cgroup(tmp_path, "0::/svc\n"))
    assert r.available_memory_mb == 0


def test_hybrid_unified_mount(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"unified/svc/cpu.max": "200000 100000"})
    r = read_resources(root, proc_cgroup(tmp_path, "1:name=systemd:/svc\n0::/svc\n"))
    assert r.usable_cpus == 2


# --- read_resources: cgroup v1 -------------------------------------------------------------------


def test_v1_cfs_quota_and_memory(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "memory/docker/abc/memory.limit_in_bytes": str(2 * GIB),
        "memory/docker/abc/memory.usage_in_bytes": str(GIB // 2),
        "memory/memory.limit_in_bytes": "9223372036854771712",
        "memory/memory.usage_in_bytes": str(5 * GIB),
    })
    (root / "cpu").symlink_to("cpu,cpuacct")
    text = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n0::/docker/abc\n"
    r = read_resources(root, proc_cgroup(tmp_path, text))
    assert r.cgroup_cpu_quota == 2.5
    assert r.usable_cpus == 3
    assert r.cgroup_memory_limit_mb == 2048
    assert r.available_memory_mb == 1536


def test_v1_minus_one_and_unlimited_memory(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {
        "cpu/cpu.cfs_quota_us": "-1",
        "cpu/cpu.cfs_period_us": "100000",
        "memory/memory.limit_in_bytes": "9223372036854771712",
        "memory/memory.usage_in_bytes": "1000",
    })
    r = read_resources(root, proc_cgroup(tmp_path, "4:cpu:/\n3:memory:/\n"))
    assert r.cgroup_cpu_quota is None
    assert r.usable_cpus == 8
    assert r.cgroup_memory_limit_mb is None
    assert r.available_memory_mb == 16 * 1024


def test_v1_quota_at_ancestor(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {
        "cpu/kubepods/cpu.cfs_quota_us": "100000",
        "cpu/kubepods/cpu.cfs_period_us": "100000",
        "cpu/kubepods/pod1/cpu.cfs_quota_us": "-1",
        "cpu/kubepods/pod1/cpu.cfs_period_us": "100000",
    })
    r = read_resources(root, proc_cgroup(tmp_path, "3:cpu:/kubepods/pod1\n"))
    assert r.usable_cpus == 1


# --- read_resources: never crash ------------------------------------------------------------------


def test_missing_and_garbage_files_give_notes(tmp_path: Path, host: None) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"svc/cpu.max": "lots 100000", "svc/memory.max": "plenty"})
    r = read_resources(root, tmp_path / "no-such-proc-file")
    assert r.usable_cpus == 8
    assert r.cgroup_memory_limit_mb is None
    assert any("no-such-proc-file" in note for note in r.notes)

    r = read_resources(root, proc_cgroup(tmp_path, "0::/svc\n"))
    assert r.usable_cpus == 8
    assert any("cannot parse" in note and "cpu.max" in note for note in r.notes)
    assert any("cannot parse" in note and "memory.max" in note for note in r.notes)


def test_nonexistent_root_and_escaping_path(tmp_path: Path, host: None) -> None:
    r = read_resources(tmp_path / "nothing-here", proc_cgroup(tmp_path, "0::/../../elsewhere\n"))
    assert r.usable_cpus == 8
    assert r.cgroup_cpu_quota is None


def test_environment_overrides_paths(tmp_path: Path, host: None, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cg"
    write_tree(root, {"svc/cpu.max": "100000 100000"})
    monkeypatch.setenv("SPOT_CGROUP_ROOT", str(root))
    monkeypatch.setenv("SPOT_PROC_SELF_CGROUP", str(proc_cgroup(tmp_path, "0::/svc\n")))
    assert read_resources().usable_cpus == 1


def test_real_child_with_one_cpu(tmp_path: Path) -> None:
    """A real process pinned to one CPU, with a fake cgroup tree allowing two."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("needs Linux CPU affinity")
    cpu = min(os.sched_getaffinity(0))
    root = tmp_path / "cg"
    write_tree(root, {"svc/cpu.max": "200000 100000"})
    env = {**os.environ, "SPOT_CGROUP_ROOT": str(root),
           "SPOT_PROC_SELF_CGROUP": str(proc_cgroup(tmp_path, "0::/svc\n")), "PYTHONPATH": str(REPO)}
    code = "import json; from supervisor.vm.sizing import read_resources; print(json.dumps(read_resources().to_dict()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=60, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    data = json.loads(out.stdout)
    assert data["affinity_cpus"] == 1
    assert data["cgroup_cpu_quota"] == 2.0
    assert data["usable_cpus"] == 1


# --- compute_plan --------------------------------------------------------------------------------


def res(cpus: int = 4, memory_mb: int = 64_000) -> Resources:
    return Resources(affinity_cpus=cpus, cgroup_cpu_quota=None, usable_cpus=cpus,
                     available_memory_mb=memory_mb, cgroup_memory_limit_mb=None, notes=())


def test_scale_out_per_core() -> None:
    plan = compute_plan(ScalingSettings(workers_per_core=1.5), "scale-out", res(4), None)
    assert (plan.workers, plan.threads) == (6, 1)
    assert plan.reasons[0] == "4 usable CPUs (affinity 4, no cgroup quota)"
    assert "×1.5 workers_per_core → 6" in plan.reasons


def test_explicit_workers_wins() -> None:
    plan = compute_plan(ScalingSettings(workers=7, max_workers=4, memory_per_worker_mb=1024),
                        "scale-out", res(2, memory_mb=3000), None)
    assert plan.workers == 7
    assert any("explicit workers = 7" in r for r in plan.reasons)
    assert any("memory would allow only 2" in r for r in plan.reasons)


def test_clamped_by_min_and_max() -> None:
    low = compute_plan(ScalingSettings(workers_per_core=0.5, min_workers=3, max_workers=10), "scale-out", res(2), None)
    assert low.workers == 3
    assert any("min_workers" in r for r in low.reasons)
    high = compute_plan(ScalingSettings(workers_per_core=4, max_workers=5), "scale-out", res(8), None)
    assert high.workers == 5
    assert any("max_workers" in r for r in high.reasons)


def test_memory_cap() -> None:
    plan = compute_plan(ScalingSettings(memory_per_worker_mb=1024), "scale-out", res(4, memory_mb=3000), None)
    assert plan.workers == 2
    assert "capped by memory: 3000 MB / 1024 MB per worker → 2" in plan.reasons


def test_memory_cap_overrides_min_workers_but_never_below_one() -> None:
    plan = compute_plan(ScalingSettings(memory_per_worker_mb=1024, min_workers=4), "scale-out", res(4, memory_mb=100), None)
    assert plan.workers == 1


def test_memory_per_worker_zero_means_no_limit() -> None:
    plan = compute_plan(ScalingSettings(memory_per_worker_mb=0), "scale-out", res(4, memory_mb=0), None)
    assert plan.workers == 4


def test_small_fraction_never_below_one() -> None:
    plan = compute_plan(ScalingSettings(workers_per_core=0.1), "scale-out", res(1), None)
    assert plan.workers == 1


def test_float_error_does_not_lose_a_worker() -> None:
    plan = compute_plan(ScalingSettings(workers_per_core=1 / 3), "scale-out", res(3), None)
    assert plan.workers == 1
    plan = compute_plan(ScalingSettings(workers_per_core=0.7), "scale-out", res(10), None)
    assert plan.workers == 7


def test_per_sku_override() -> None:
    scaling = ScalingSettings(sku={"Standard_D2s_v3": {"workers_per_core": 2.0}, "Standard_F4": {"workers": 9}})
    plan = compute_plan(scaling, "scale-out", res(2), "Standard_D2s_v3")
    assert plan.workers == 4
    assert plan.vm_size == "Standard_D2s_v3"
    assert "per-SKU override for Standard_D2s_v3: workers_per_core=2.0" in plan.reasons
    other = compute_plan(scaling, "scale-out", res(2), "Standard_E2")
    assert other.workers == 2
    assert not any("per-SKU" in r for r in other.reasons)
    nocase = compute_plan(scaling, "scale-out", res(2), "standard_f4")
    assert nocase.workers == 9


def test_scale_up_threads() -> None:
    plan = compute_plan(ScalingSettings(threads_per_core=4, workers=3), "scale-up", res(4), None)
    assert (plan.workers, plan.threads) == (1, 16)
    assert any("ignored in scale-up" in r for r in plan.reasons)


def test_unknown_mode() -> None:
    with pytest.raises(ValueError):
        compute_plan(ScalingSettings(), "sideways", res(), None)


def test_plan_json_and_text() -> None:
    plan = compute_plan(ScalingSettings(), "scale-out", res(2, memory_mb=4000), "Standard_D2s_v3")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data == {"mode": "scale-out", "workers": 2, "threads": 1, "usable_cpus": 2, "available_memory_mb": 4000,
                    "vm_size": "Standard_D2s_v3", "reasons": list(plan.reasons), "gpus": [], "gpu_per_slot": False,
                    "slots": [{"slot": 0, "gpu": None, "cuda_visible_devices": None},
                              {"slot": 1, "gpu": None, "cuda_visible_devices": None}]}
    text = format_plan(plan)
    assert "workers:  2" in text and "Standard_D2s_v3" in text and "why:" in text
    assert isinstance(plan, Plan)
