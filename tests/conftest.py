"""Fixtures: one real Azurite (queue service, in memory) per test run, a fresh queue per test,
and `supervisors`, which starts `spot-supervisor` processes and kills their process groups afterwards.

Helpers live in testsupport/ (importable thanks to pytest's `pythonpath = ["."]`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite, running_azurite
from testsupport.harness import Supervisor


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    with running_azurite(tmp_path_factory.mktemp("azurite")) as running:
        yield running


@pytest.fixture
def queue_name() -> str:
    return f"t{uuid.uuid4().hex[:20]}"


@pytest.fixture
def queue(azurite: Azurite, queue_name: str) -> QueueClient:
    client = azurite.queue(queue_name)
    client.create_queue()
    return client


@pytest.fixture
def supervisors(tmp_path: Path) -> Iterator[Callable[..., Supervisor]]:
    """start(env, *args, preexec_fn=None) -> Supervisor (args default to "run"); all are killed at teardown."""
    started: list[Supervisor] = []

    def start(env: dict[str, str], *args: str, preexec_fn: Callable[[], None] | None = None) -> Supervisor:
        sup = Supervisor(env, tmp_path, *args, preexec_fn=preexec_fn)
        started.append(sup)
        return sup

    try:
        yield start
    finally:
        for sup in started:
            sup.cleanup()
