"""The repo's pinned Azurite (queue service only, in memory) on a free local port.

Used by the test fixture (tests/conftest.py), the benchmarks and the local demo.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from azure.storage.queue import QueueClient

from testsupport.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parent.parent
AZURITE_QUEUE = REPO / "node_modules" / ".bin" / "azurite-queue"
ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


@dataclass(frozen=True)
class Azurite:
    """A running Azurite, as tests and tools see it."""

    port: int

    @property
    def connection_string(self) -> str:
        return connection_string(self.port)

    def queue(self, name: str) -> QueueClient:
        return QueueClient.from_connection_string(self.connection_string, name)


def start_azurite(port: int, workdir: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """--skipApiVersionCheck: the SDK speaks a newer REST version than Azurite knows (see README)."""
    if not AZURITE_QUEUE.exists():
        raise FileNotFoundError(f"{AZURITE_QUEUE} is missing: run scripts/setup.sh (npm ci) first")
    proc = subprocess.Popen(
        [str(AZURITE_QUEUE), "--queueHost", "127.0.0.1", "--queuePort", str(port), "--inMemoryPersistence",
         "--skipApiVersionCheck", "--disableTelemetry", "--loose"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir,
    )
    try:
        wait_for_port(port)
    except TimeoutError:
        proc.kill()
        raise
    return proc


def stop_azurite(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_azurite(workdir: Path) -> Iterator[Azurite]:
    """A fresh Azurite on a free port for the duration of the block; its log is workdir/azurite.log."""
    with (workdir / "azurite.log").open("wb") as log:
        port = free_port()
        proc = start_azurite(port, workdir, log)
        try:
            yield Azurite(port)
        finally:
            stop_azurite(proc)
