"""Start the repo's pinned Azurite (queue service only, in memory) on a free local port.

Shared by the test fixture and the local demo.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
AZURITE_QUEUE = REPO / "node_modules" / ".bin" / "azurite-queue"
ACCOUNT = "devstoreaccount1"
# Azurite's documented, public development key.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


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


def connection_string(port: int) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"QueueEndpoint=http://127.0.0.1:{port}/{ACCOUNT};")


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


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
