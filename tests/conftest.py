"""Shared fixtures: one real Azurite (queue service, in memory) per test run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient, QueueServiceClient

REPO = Path(__file__).resolve().parent.parent
AZURITE_BIN = REPO / "node_modules" / ".bin" / "azurite-queue"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@dataclass(frozen=True)
class Azurite:
    port: int

    @property
    def connection_string(self) -> str:
        return (
            "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
            f"AccountKey={AZURITE_KEY};QueueEndpoint=http://127.0.0.1:{self.port}/devstoreaccount1;"
        )

    def service(self) -> QueueServiceClient:
        return QueueServiceClient.from_connection_string(self.connection_string)

    def queue(self, name: str) -> QueueClient:
        return QueueClient.from_connection_string(self.connection_string, name)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    if not AZURITE_BIN.exists():
        pytest.fail(f"{AZURITE_BIN} is missing: run scripts/test.sh (it runs npm ci) or `npm ci` in the repo")
    port = free_port()
    workdir = tmp_path_factory.mktemp("azurite")
    log = (workdir / "azurite.log").open("wb")
    proc = subprocess.Popen(
        [str(AZURITE_BIN), "--queueHost", "127.0.0.1", "--queuePort", str(port), "--inMemoryPersistence",
         "--skipApiVersionCheck", "--loose", "--location", str(workdir)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_for_port(port)
        yield Azurite(port)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def queue(azurite: Azurite, queue_name: str) -> QueueClient:
    client = azurite.queue(queue_name)
    client.create_queue()
    return client


@pytest.fixture
def cli_env(azurite: Azurite) -> dict[str, str]:
    """Environment for a `spot-supervisor` child process aimed at the test Azurite."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env["SPOT_QUEUE_CONNECTION_STRING"] = azurite.connection_string
    env["SPOT_EVENTS_SOURCE"] = "none"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spot_supervisor_cmd() -> list[str]:
    exe = shutil.which("spot-supervisor", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "supervisor"]
