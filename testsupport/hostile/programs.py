"""Hostile parts for the attack tests of programs as handlers (tests/attack/test_programs.py)."""

from __future__ import annotations

import ctypes
import secrets
import stat
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

PR_CAPBSET_DROP = 24

# A program that looks for the given secret values wherever a same-uid process might find them: its own
# environment, and the environment block, command line and memory of its worker (its parent) and of the
# supervisor (its grandparent). One line per place: "hostile: LEAK <name> in <place>", "refused <place>"
# or "clean <place>"; "hostile: done" at the end. The values come from the file named by $PROG_SECRETS
# (lines NAME=VALUE), never from a variable the package would strip.
SECRETS_SCANNER = r'''
import os, sys

wanted = dict(line.split("=", 1) for line in open(os.environ["PROG_SECRETS"]).read().splitlines() if line)
wanted = {name: value.encode() for name, value in wanted.items()}
sys.stdin.read()


def report(place, data):
    found = [name for name, value in wanted.items() if value in data]
    for name in found:
        print(f"hostile: LEAK {name} in {place}", flush=True)
    if not found:
        print(f"hostile: clean {place}", flush=True)


def read(place):
    try:
        with open(place, "rb") as fh:
            return fh.read()
    except OSError as exc:
        print(f"hostile: refused {place} ({exc.strerror})", flush=True)
        return None


def memory(pid):
    try:
        with open(f"/proc/{pid}/maps", "rb") as fh:
            maps = fh.read()
    except OSError as exc:
        print(f"hostile: refused /proc/{pid}/mem (its maps: {exc.strerror})", flush=True)
        return
    chunks = []
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
            for line in maps.decode().splitlines():
                span, perms = line.split()[:2]
                start, end = (int(x, 16) for x in span.split("-"))
                if "r" not in perms or end - start > 256 << 20:
                    continue
                try:
                    mem.seek(start)
                    chunks.append(mem.read(end - start))
                except (OSError, OverflowError, ValueError):
                    continue
    except OSError as exc:
        print(f"hostile: refused /proc/{pid}/mem ({exc.strerror})", flush=True)
        return
    if not chunks:
        print(f"hostile: refused /proc/{pid}/mem (nothing readable)", flush=True)
        return
    report(f"/proc/{pid}/mem", b"".join(chunks))


report("own environment", "\0".join(f"{k}={v}" for k, v in os.environ.items()).encode())
worker = os.getppid()
supervisor = int(open(f"/proc/{worker}/stat").read().rsplit(")", 1)[1].split()[1])
for pid in (worker, supervisor):
    for name in ("environ", "cmdline"):
        data = read(f"/proc/{pid}/{name}")
        if data is not None:
            report(f"/proc/{pid}/{name}", data)
    memory(pid)
print("hostile: done", flush=True)
'''


def planted_secrets() -> dict[str, str]:
    """A fresh value for some of the secrets the package must keep from programs (the queue's own key comes
    with the test's connection string)."""
    token = secrets.token_hex(12)
    return {
        "AZURE_CLIENT_SECRET": f"client-secret-{token}",
        "AZURE_CLIENT_CERTIFICATE_PASSWORD": f"cert-password-{token}",
        "IDENTITY_HEADER": f"identity-header-{token}",
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=x;AccountKey=storage-key-{token}",
        # Read into the telemetry settings (in memory too); its endpoint refuses connections at once.
        "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={uuid.uuid4()};"
                                                 "IngestionEndpoint=http://127.0.0.1:9/",
    }


def write_python_program(path: Path, source: str) -> Path:
    """An executable Python program run by this interpreter."""
    path.write_text(f"#!{sys.executable}\n{source}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def drop_all_capabilities() -> None:
    """preexec_fn: the child keeps uid 0 but loses every capability at exec (an empty bounding set).
    Root without capabilities stands for "the same uid, no privileges": /proc/PID/environ and
    /proc/PID/mem of a dumpable process are readable by a capability-less process of the same uid,
    those of a non-dumpable one are not."""
    libc = ctypes.CDLL(None, use_errno=True)
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last + 1):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def lines_with(log: str, needle: str) -> list[str]:
    return [line for line in log.splitlines() if needle in line]


def hostile_lines(log: str) -> Iterator[str]:
    for line in log.splitlines():
        _, sep, rest = line.partition("stdout: hostile: ")
        if sep:
            yield rest
