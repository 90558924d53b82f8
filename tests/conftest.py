"""Shared fixtures: one real Azurite (queue service, in memory) per test run."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO / "scripts"))

from local_azurite import (  # noqa: E402
    connection_string,
    free_port,
    start_azurite,
    stop,
    wait_for_port,
)

__all__ = ["Azurite", "free_port", "wait_for_port"]


@dataclass(frozen=True)
class Azurite:
    port: int

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    def queue(self, name: str) -> QueueClient:
        return QueueClient.from_connection_string(self.connection_string, name)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    workdir = tmp_path_factory.mktemp("azurite")
    with (workdir / "azurite.log").open("wb") as log:
        port = free_port()
        proc = start_azurite(port, workdir, log)
        try:
            yield Azurite(port)
        finally:
            stop(proc)


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def queue(azurite: Azurite, queue_name: str) -> QueueClient:
    client = azurite.queue(queue_name)
    client.create_queue()
    return client


def child_env(azurite: Azurite, **spot: str) -> dict[str, str]:
    """Environment for a child process (worker or supervisor) aimed at the test Azurite.

    events.source is "none" and cost.enabled false unless a test says otherwise: the real IMDS
    address and the public Retail Prices API are never contacted from tests.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update({"SPOT_QUEUE_CONNECTION_STRING": azurite.connection_string, "SPOT_EVENTS_SOURCE": "none",
                "SPOT_COST_ENABLED": "false",
                "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])})
    env.update({f"SPOT_{k.upper()}": v for k, v in spot.items()})
    return env


AZURE_FIXTURES = REPO.parent / "shared" / "fixtures" / "azure"
