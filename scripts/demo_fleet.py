"""`demo.sh --fleet`: the fleet keeper's story, locally, from 0 VMs and back.

Azurite (the queue), the ARM stand-in over HTTPS with two scale sets (spot-d2: Delete eviction policy,
room for only 3 VMs, so it refuses part of the allocation; spot-e2: Deallocate policy), the IMDS
simulator as the keeper's token endpoint, and `spot-supervisor fleet run`. Each instance the stand-in
"creates" is a real `spot-supervisor run` process with its own IMDS simulator (its name and
resourceId); an eviction posts a Preempt to that VM's simulator and stops the process at NotBefore.

400 messages arrive; the keeper scales up over both scale sets; two evictions hit mid-run and are
restored; the queue empties; idle VMs retire; the fleet returns to min_vms. The summary prints lost
(must be 0), duplicates, evictions restored and how fast, VM-minutes, and a small plot.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient

from supervisor.simulator.arm import ArmStandIn
from supervisor.simulator.arm_state import Instance, ScaleSet
from supervisor.simulator.server import ImdsSimulator
from supervisor.simulator.tls import make_self_signed
from testsupport.azurite import connection_string, start_azurite, stop_azurite
from testsupport.net import free_port

MESSAGES = 400
QUEUE = "fleet-demo"
MIN_VMS, MAX_VMS = 1, 6
RETIRE_WHEN_IDLE_S = 8
NOTICE_S = 8.0
BIN = Path(sys.executable).parent / "spot-supervisor"
IMG = Path(__file__).resolve().parent.parent / "docs" / "img"


class VmSimulator(ImdsSimulator):
    """One VM's IMDS: instance metadata names the scale-set instance (its resourceId is what it retires by)."""

    def __init__(self, name: str, resource_id: str) -> None:
        super().__init__(vm_name=name, notice_s=NOTICE_S)
        self.resource_id = resource_id

    def instance_document(self) -> dict[str, Any]:
        document = super().instance_document()
        document["compute"]["resourceId"] = self.resource_id
        return document


class Vms:
    """The stand-in's hooks: an instance is a supervisor process plus its IMDS simulator."""

    def __init__(self, env: dict[str, str], work: Path) -> None:
        self.env, self.work = env, work
        self.lock = threading.Lock()
        self.running: dict[str, tuple[subprocess.Popen[bytes], VmSimulator]] = {}
        self.vm_seconds = 0.0

    def key(self, scale_set: ScaleSet, instance: Instance) -> str:
        return f"{scale_set.id}/virtualMachines/{instance.instance_id}"

    def boot(self, scale_set: ScaleSet, instance: Instance) -> None:
        key = self.key(scale_set, instance)
        sim = VmSimulator(instance.name, key).start()
        env = {**self.env, "SPOT_EVENTS_SOURCE": "azure", "SPOT_EVENTS_ENDPOINT": sim.url, "SPOT_EVENTS_POLL_INTERVAL_S": "0.5"}
        log = (self.work / f"{instance.name}.log").open("ab")
        proc = subprocess.Popen([str(BIN), "run"], env=env, stderr=log, stdout=log, start_new_session=True)
        with self.lock:
            self.running[key] = (proc, sim)
        print(f"  [arm] {instance.name} boots (pid {proc.pid})", flush=True)

    def kill(self, scale_set: ScaleSet, instance: Instance) -> None:
        with self.lock:
            found = self.running.pop(self.key(scale_set, instance), None)
        if found is not None:
            proc, sim = found
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the VM is gone: no goodbye
            except ProcessLookupError:
                pass
            proc.wait()
            sim.stop()
            print(f"  [arm] {instance.name} is gone", flush=True)

    def preempt(self, arm: ArmStandIn, scale_set_id: str, instance_id: str, evicted: list[float]) -> None:
        """Azure's side of an eviction: the notice in the VM's Scheduled Events, then at NotBefore the
        scale set evicts the instance (Delete: gone; Deallocate: stopped), which stops its process."""
        with self.lock:
            found = self.running.get(f"{scale_set_id}/virtualMachines/{instance_id}")
        if found is None:
            return
        found[1].simulate_eviction(delay_s=NOTICE_S)
        print(f"  [arm] Preempt for {found[1].vm_name}, NotBefore in {NOTICE_S:g}s", flush=True)

        def at_not_before() -> None:
            result = arm.evict(scale_set_id, instance_id)
            evicted.append(time.time())
            print(f"  [arm] {found[1].vm_name} evicted ({result['policy']})", flush=True)

        threading.Timer(NOTICE_S, at_not_before).start()

    def stop_all(self) -> None:
        with self.lock:
            items = list(self.running.values())
            self.running.clear()
        for proc, sim in items:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            sim.stop()


def done(results: Path) -> list[str]:
    if not results.exists():
        return []
    return [json.loads(line)["id"] for line in results.read_text().splitlines() if line.strip()]


def queued(client: QueueClient) -> int:
    return int(client.get_queue_properties().approximate_message_count or 0)


def alive(arm: ArmStandIn) -> int:
    return sum(1 for s in arm.snapshot().values() for i in s["instances"].values() if i["power"] in ("running", "starting"))


def created(arm: ArmStandIn) -> int:
    with arm.lock:
        return sum(s.next_id for s in arm.scale_sets.values())


def restored(arm: ArmStandIn, created_before: int) -> bool:
    """The Deallocate eviction (spot-e2_0) running again and a new instance made for the Delete one."""
    e2 = arm.snapshot()["spot-e2"]["instances"]
    return e2.get("0", {}).get("power") == "running" and created(arm) > created_before


def plot(samples: list[tuple[float, int, int]]) -> str:
    """A text plot of VMs (#) and backlog (.) over time, one column per sample bucket; also a PNG if matplotlib is there."""
    if not samples:
        return ""
    width = 60
    step = max(1, len(samples) // width)
    cols = samples[::step]
    top_backlog = max(1, max(b for _, _, b in cols))
    rows = []
    for level in range(MAX_VMS, 0, -1):
        line = "".join("#" if v >= level else ("." if b * MAX_VMS / top_backlog >= level else " ") for _, v, b in cols)
        rows.append(f"{level:>3} |{line}")
    rows.append("    +" + "-" * len(cols))
    rows.append(f"     0s{' ' * (len(cols) - 10)}{cols[-1][0]:.0f}s   # VMs alive, . backlog (scaled to {top_backlog} msgs)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3))
        ax.step([t for t, _, _ in samples], [v for _, v, _ in samples], where="post", label="VMs alive")
        ax.set_xlabel("seconds")
        ax.set_ylabel("VMs")
        ax2 = ax.twinx()
        ax2.plot([t for t, _, _ in samples], [b for _, _, b in samples], color="tab:orange", label="backlog")
        ax2.set_ylabel("messages")
        fig.legend(loc="upper right")
        fig.tight_layout()
        IMG.mkdir(parents=True, exist_ok=True)
        fig.savefig(IMG / "fleet-demo.png", dpi=100)
        rows.append(f"plot saved: {IMG / 'fleet-demo.png'}")
    except ImportError:
        rows.append("(matplotlib not installed: text plot only; scripts/setup.sh test,bench installs it)")
    return "\n".join(rows)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="spot-fleet-demo-"))
    results = work / "results.jsonl"
    print(f"\n=== the fleet demo: work dir {work}", flush=True)
    azurite_port = free_port()
    azurite_log = (work / "azurite.log").open("wb")
    azurite = start_azurite(azurite_port, work, azurite_log)
    cert, key = make_self_signed(work / "tls")
    arm = ArmStandIn(cert, key).start()
    identity = ImdsSimulator(vm_name="fleet-keeper", priority="Regular").start()
    base = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    base.update({"SPOT_QUEUE_CONNECTION_STRING": connection_string(azurite_port), "SPOT_QUEUE_NAME": QUEUE,
                 "SPOT_QUEUE_VISIBILITY_TIMEOUT_S": "20", "SPOT_QUEUE_BATCH_SIZE": "4", "SPOT_SCALING_WORKERS": "1",
                 "SPOT_COST_ENABLED": "false", "SPOT_SHUTDOWN_DRAIN_TIMEOUT_S": "5", "SPOT_SAMPLE_RESULTS": str(results),
                 "SPOT_FLEET_RETIRE_WHEN_IDLE_S": str(RETIRE_WHEN_IDLE_S), "PYTHONUNBUFFERED": "1"})
    vms = Vms(base, work)
    arm.on_create, arm.on_start, arm.on_remove, arm.on_evict = vms.boot, vms.boot, vms.kill, vms.kill
    first = arm.add_scale_set("spot-d2", eviction_policy="Delete", available=3, refusal_code="SkuNotAvailable")
    second = arm.add_scale_set("spot-e2", eviction_policy="Deallocate")
    keeper_env = {**base, "REQUESTS_CA_BUNDLE": str(cert), "AZURE_POD_IDENTITY_AUTHORITY_HOST": identity.url,
                  "SPOT_FLEET_SCALE_SETS": f"{first},{second}", "SPOT_FLEET_ARM_ENDPOINT": arm.url,
                  "SPOT_FLEET_MESSAGES_PER_VM": "50", "SPOT_FLEET_MIN_VMS": str(MIN_VMS), "SPOT_FLEET_MAX_VMS": str(MAX_VMS),
                  "SPOT_FLEET_INTERVAL_S": "2", "SPOT_FLEET_ALLOCATION_COOLDOWN_S": "20"}
    client = QueueClient.from_connection_string(connection_string(azurite_port), QUEUE)
    client.create_queue()
    keeper = subprocess.Popen([str(BIN), "fleet", "run"], env=keeper_env, stderr=(work / "keeper.log").open("wb"))
    samples: list[tuple[float, int, int]] = []
    restores: list[float] = []
    started = time.time()
    try:
        print(f"=== {MESSAGES} messages arrive; the keeper (log: {work / 'keeper.log'}) scales up from 0", flush=True)
        subprocess.run([str(BIN), "enqueue", "--count", str(MESSAGES), "--chunks", "4", "--chunk-ms", "100"], env=base, check=True,
                       stdout=subprocess.DEVNULL)
        noticed = False
        evicted: list[float] = []
        created_before = 0
        deadline = time.time() + 600
        while time.time() < deadline:
            now = time.time() - started
            count, backlog = alive(arm), queued(client)
            samples.append((now, count, backlog))
            vms.vm_seconds += count
            finished = len(set(done(results)))
            if not noticed and finished >= MESSAGES // 5:
                print(f"=== evictions mid-run ({finished} done): one VM in each scale set", flush=True)
                noticed, created_before = True, created(arm)
                for scale_set_id in (first, second):
                    instances = [i for i, v in arm.snapshot()[scale_set_id.rsplit('/', 1)[-1]]["instances"].items()
                                 if v["power"] == "running"]
                    if instances:
                        vms.preempt(arm, scale_set_id, instances[0], evicted)
            if len(evicted) == 2 and not restores and restored(arm, created_before):
                restores.append(time.time() - max(evicted))
                print(f"=== both evictions restored {restores[0]:.1f}s after they took effect: the deallocated VM "
                      f"started again, the deleted one replaced ({count} VMs alive)", flush=True)
            if finished >= MESSAGES and backlog == 0 and count <= MIN_VMS:
                break
            time.sleep(1.0)
        ids = done(results)
        unique = set(ids)
        lost = MESSAGES - len(unique) - queued(client)
        print("\n=== summary")
        print(f"processed {len(unique)} of {MESSAGES}, duplicates {len(ids) - len(unique)}, still queued {queued(client)}, lost = {lost}")
        print(f"evictions: 2 (spot-d2: Delete, spot-e2: Deallocate), fleet restored "
              f"{'%.1fs' % restores[0] if restores else 'NOT'} after them")
        print(f"VM-minutes used: {vms.vm_seconds / 60:.1f} over {time.time() - started:.0f}s; final size {alive(arm)} (min_vms {MIN_VMS})")
        print(plot(samples))
        ok = lost == 0 and len(unique) == MESSAGES and bool(restores) and alive(arm) == MIN_VMS
        print("RESULT: " + ("OK: scaled up, restored, retired, nothing lost" if ok else "FAILED"), flush=True)
        return 0 if ok else 1
    finally:
        keeper.terminate()
        try:
            keeper.wait(30)
        except subprocess.TimeoutExpired:
            keeper.kill()
        vms.stop_all()
        arm.stop()
        identity.stop()
        stop_azurite(azurite)
        azurite_log.close()


if __name__ == "__main__":
    sys.exit(main())
