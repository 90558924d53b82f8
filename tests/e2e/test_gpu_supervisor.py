"""GPU VMs as an operator sees them: `spot-supervisor plan` and `run` as real processes
with a stand-in nvidia-smi on PATH (tests/nvidia_smi_standin.py), real workers, a real
Azurite queue and real signals.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient
from nvidia_smi_standin import install, uuids

from testsupport.azurite import Azurite
from testsupport.handlers import read_json_lines
from testsupport.harness import SPAWNED, Supervisor, child_env, run_plan
from testsupport.waiting import wait_until


def gpu_env(azurite: Azurite, bin_dir: Path, **spot: str) -> dict[str, str]:
    env = child_env(azurite, scaling_memory_per_worker_mb="0", **spot)
    env["PATH"] = str(bin_dir)  # only the stand-in (or nothing): a real nvidia-smi elsewhere must not count
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def discovery_warnings(log: str) -> list[str]:
    return [line for line in log.splitlines() if "GPU discovery failed" in line]


def test_plan_sizes_by_gpu(azurite: Azurite, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    install(tmp_path / "bin", gpus=4)
    one = run_plan(supervisors, gpu_env(azurite, tmp_path / "bin", scaling_workers_per_gpu="1"))
    assert one["workers"] == 4
    assert one["gpus"] == [{"index": i, "uuid": uuids(4)[i], "name": "NVIDIA H100 NVL", "memory_mb": 95830} for i in range(4)]
    assert [s["cuda_visible_devices"] for s in one["slots"]] == uuids(4)

    two = run_plan(supervisors, gpu_env(azurite, tmp_path / "bin", scaling_workers_per_gpu="2"))
    assert two["workers"] == 8
    assert Counter(s["gpu"] for s in two["slots"]) == {0: 2, 1: 2, 2: 2, 3: 2}

    kept = run_plan(supervisors, {**gpu_env(azurite, tmp_path / "bin"), "CUDA_VISIBLE_DEVICES": f"3,{uuids(4)[1]}"})
    assert kept["workers"] == 2 and [s["gpu"] for s in kept["slots"]] == [3, 1]
    assert any("2 of 4 GPUs used" in reason for reason in kept["reasons"]), kept["reasons"]

    text = supervisors(gpu_env(azurite, tmp_path / "bin", scaling_workers_per_gpu="2"), "plan")
    assert text.wait(20) == 0
    assert text.proc.stdout is not None
    out = text.proc.stdout.read().decode()
    assert "workers:  8" in out and "GPUs:     4 GPUs (4 × NVIDIA H100 NVL, 95830 MB)" in out
    assert f"worker 7 → GPU 3 ({uuids(4)[3]})" in out


@pytest.mark.parametrize("mode", ["absent", "garbage", "no-driver"])
def test_no_usable_gpu_tool_sizes_by_cpu(azurite: Azurite, tmp_path: Path, supervisors: Callable[..., Supervisor], mode: str) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if mode != "absent":
        install(bin_dir, mode=mode)
    sup = supervisors(gpu_env(azurite, bin_dir, scaling_workers_per_core="1"), "plan", "--json")
    assert sup.wait(20) == 0, sup.log()
    assert sup.proc.stdout is not None
    plan = json.loads(sup.proc.stdout.read())
    cpus = len(os.sched_getaffinity(0))
    assert (plan["workers"], plan["gpus"], plan["gpu_per_slot"]) == (cpus, [], False)
    warnings = discovery_warnings(sup.log())
    if mode == "absent":
        assert warnings == [], sup.log()
    else:
        assert len(warnings) == 1, sup.log()
        assert "WARNING" in warnings[0] or "warning" in warnings[0].lower()


def test_each_worker_sees_only_its_gpu_and_a_respawn_gets_it_back(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                                   tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    install(tmp_path / "bin", gpus=4)
    imports, events = tmp_path / "imports.jsonl", tmp_path / "events.jsonl"
    env = gpu_env(azurite, tmp_path / "bin", queue_name=queue_name, workload_handler="testsupport.gpu_handlers:record",
                  scaling_workers_per_gpu="2", queue_batch_size="1", queue_prefetch_s="0", queue_idle_poll_max_s="0.2",
                  shutdown_drain_timeout_s="5")
    env.update(GPU_IMPORTS=str(imports), GPU_EVENTS=str(events))
    ids = [queue.send_message(f"m{i}").id for i in range(24)]
    sup = supervisors(env)
    sup.wait_for_workers(8, timeout=30)
    wait_until(lambda: len(read_json_lines(imports)) >= 8, 30, lambda: f"8 handler imports; log:\n{sup.log()[-3000:]}")

    spawned = {int(m[1]): (int(m[2]), int(m[3]), m[4]) for m in SPAWNED.finditer(sup.log())}  # pid → (slot, gpu, uuid)
    assert len(spawned) == 8 and Counter(gpu for _, gpu, _ in spawned.values()) == {0: 2, 1: 2, 2: 2, 3: 2}
    seen = {line["pid"]: line for line in read_json_lines(imports)}
    # The handler was imported only in workers (never in the supervisor), each already pinned to its slot's GPU.
    assert set(seen) == set(spawned)
    assert all(line["ppid"] == sup.pid for line in seen.values())
    assert all(seen[pid]["cuda"] == uuid for pid, (_, _, uuid) in spawned.items())
    assert Counter(line["cuda"] for line in seen.values()) == {u: 2 for u in uuids(4)}

    wait_until(lambda: {e["id"] for e in read_json_lines(events)} >= set(ids), 30, "every message to be handled")
    handled = read_json_lines(events)
    assert all(e["cuda"] == seen[e["pid"]]["cuda"] for e in handled)  # one GPU for the whole life of a worker

    victim = next(pid for pid, (slot, _, _) in spawned.items() if slot == 5)
    os.kill(victim, signal.SIGKILL)

    def respawned() -> tuple[int, int, str] | None:
        for m in SPAWNED.finditer(sup.log()):
            if int(m[1]) not in spawned:
                return int(m[1]), int(m[2]), m[4]
        return None
    new_pid, new_slot, new_uuid = wait_until(respawned, 15, lambda: f"a respawn; log:\n{sup.log()[-3000:]}")
    assert (new_slot, new_uuid) == (5, spawned[victim][2])
    wait_until(lambda: any(line["pid"] == new_pid for line in read_json_lines(imports)), 20, "the respawned worker's import")
    assert next(line["cuda"] for line in read_json_lines(imports) if line["pid"] == new_pid) == spawned[victim][2]
    sup.send(signal.SIGTERM)
    assert sup.wait(15) == 0
