from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from supervisor import sdnotify


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    return sock


@pytest.fixture
def path_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    with bound_socket(str(path)) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_no_socket_is_silent() -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready("up") is False
    assert sdnotify.watchdog() is False


def test_ready_with_status_is_one_datagram(path_socket: socket.socket) -> None:
    assert sdnotify.ready("4 workers") is True
    assert path_socket.recv(4096) == b"READY=1\nSTATUS=4 workers"


def test_helpers(path_socket: socket.socket) -> None:
    assert sdnotify.status("draining\n3 left")
    assert path_socket.recv(4096) == b"STATUS=draining 3 left"
    assert sdnotify.stopping()
    assert path_socket.recv(4096) == b"STOPPING=1"
    assert sdnotify.watchdog()
    assert path_socket.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.ready()
    assert path_socket.recv(4096) == b"READY=1"


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"spot-supervisor-test-{uuid.uuid4().hex}"
    with bound_socket("\0" + name) as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=ok") is True
        assert sock.recv(4096) == b"READY=1\nSTATUS=ok"


def test_send_error_is_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    with caplog.at_level("DEBUG", logger="supervisor.sdnotify"):
        assert sdnotify.notify("READY=1") is False
    assert "sd_notify" in caplog.text


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    (None, None, None),
    ("30000000", None, 30.0),
    ("500000", "self", 0.5),
    ("30000000", "other", None),  # meant for another process
    ("30000000", "not-a-pid", None),
    ("0", None, None),
    ("soon", None, None),
])
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None,
                           expected: float | None) -> None:
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid))
    assert sdnotify.watchdog_interval_s() == expected
