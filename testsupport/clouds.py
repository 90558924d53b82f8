"""The AWS and GCP metadata simulators for tests: fixtures, HTTP control, a supervisor aimed at them.

Test modules import the fixtures they use (`from testsupport.clouds import aws_sim, ...`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.simulator.aws import AwsMetadata
from supervisor.simulator.gcp import GcpMetadata
from supervisor.simulator.metadata_http import MetadataServer
from testsupport.azurite import REPO, Azurite
from testsupport.handlers import RECORD_ENV
from testsupport.harness import SAMPLE_RESULTS, Supervisor, child_env

FIXTURES = REPO / "tests" / "fixtures"
DMI = FIXTURES / "dmi"


def control(sim: MetadataServer, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """A /simulate/* request over HTTP; its JSON answer."""
    response = httpx.request(method, f"{sim.url}{path}", json=body or {}, timeout=5)
    response.raise_for_status()
    return response.json()


@pytest.fixture
def aws_sim() -> Iterator[MetadataServer]:
    with MetadataServer(AwsMetadata()) as sim:
        yield sim


@pytest.fixture
def gcp_sim() -> Iterator[MetadataServer]:
    with MetadataServer(GcpMetadata()) as sim:
        yield sim


@pytest.fixture
def start_on_cloud(azurite: Azurite, queue_name: str, tmp_path: Path,
                   supervisors: Callable[..., Supervisor]) -> Callable[..., Supervisor]:
    """start(sim, **spot) -> a supervisor with 2 workers on the test's queue whose notices come from `sim`
    (source picked by "auto" from the fake DMI files of sim's cloud), polling every 0.25 s."""

    def start(sim: MetadataServer, **spot: str) -> Supervisor:
        dmi = {"aws": "aws-nitro", "gcp": "gcp"}[sim.model.cloud]
        settings = {"queue_name": queue_name, "queue_visibility_timeout_s": "10", "queue_batch_size": "8",
                    "scaling_workers": "2", "shutdown_drain_timeout_s": "20", "events_source": "auto",
                    "events_dmi_dir": str(DMI / dmi), "events_endpoint": sim.url,
                    "events_poll_interval_s": "0.25", "events_request_timeout_s": "0.5"}
        settings.update(spot)
        env = child_env(azurite, **settings)
        env["SPOT_SAMPLE_RESULTS"] = str(tmp_path / SAMPLE_RESULTS)
        env[RECORD_ENV] = str(tmp_path / "records.jsonl")
        return supervisors(env)

    return start
