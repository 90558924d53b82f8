"""The fleet keeper's test rig: the ARM stand-in over HTTPS (certificate made now), the IMDS simulator
as the managed-identity token endpoint, and `spot-supervisor fleet ...` run as a real process against
them and the test Azurite."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient

from supervisor.fleet.retire import fleet_queue_name
from supervisor.simulator.arm import ArmStandIn
from supervisor.simulator.server import ImdsSimulator
from supervisor.simulator.tls import make_self_signed
from testsupport.azurite import Azurite
from testsupport.harness import child_env

FAST_FLEET = {"fleet_allocation_cooldown_s": "2", "fleet_allocation_cooldown_max_s": "8", "fleet_request_timeout_s": "5",
              "fleet_interval_s": "0.5"}


@dataclass
class FleetRig:
    azurite: Azurite
    queue_name: str
    workdir: Path
    arm: ArmStandIn = field(init=False)
    imds: ImdsSimulator = field(init=False)
    scale_sets: list[str] = field(default_factory=list)

    def start(self) -> FleetRig:
        cert, key = make_self_signed(self.workdir / "tls")
        self.cert = cert
        self.arm = ArmStandIn(cert, key).start()
        self.imds = ImdsSimulator(vm_name="fleet-keeper", priority="Regular").start()
        return self

    def stop(self) -> None:
        self.arm.stop()
        self.imds.stop()

    def add_scale_set(self, name: str, **kwargs: Any) -> str:
        scale_set_id = self.arm.add_scale_set(name, **kwargs)
        self.scale_sets.append(scale_set_id)
        return scale_set_id

    def env(self, **spot: str) -> dict[str, str]:
        settings = {"queue_name": self.queue_name, "fleet_scale_sets": ",".join(self.scale_sets),
                    "fleet_arm_endpoint": self.arm.url, **FAST_FLEET, **spot}
        env = child_env(self.azurite, **settings)
        env.update({"REQUESTS_CA_BUNDLE": str(self.cert), "AZURE_POD_IDENTITY_AUTHORITY_HOST": self.imds.url})
        for name in ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PATH", "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT",
                     "MSI_ENDPOINT"):
            env.pop(name, None)
        return env

    def fleet(self, *args: str, **spot: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "supervisor", "fleet", *args], env=self.env(**spot), capture_output=True,
                              text=True, timeout=180)

    def once(self, **spot: str) -> subprocess.CompletedProcess[str]:
        result = self.fleet("run", "--once", **spot)
        assert result.returncode == 0, result.stderr
        return result

    def plan(self, **spot: str) -> dict[str, Any]:
        result = self.fleet("plan", "--json", **spot)
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def fleet_queue(self) -> QueueClient:
        client = self.azurite.queue(fleet_queue_name(self.queue_name))
        try:
            client.create_queue()
        except Exception:
            pass
        return client

    def alive(self, name: str) -> list[str]:
        instances = self.arm.snapshot()[name]["instances"]
        return sorted((i for i, v in instances.items() if v["power"] in ("running", "starting")), key=int)
