"""What every benchmark here shares: a local Azurite, filling a queue, the completion
log the handlers write, the request counter, process-tree memory, percentiles and
the results file.

Benchmarks print numbers and write JSON (bench/results/<name>.json by default);
they assert nothing about speed. `bench/plots.py` turns the JSON into PNGs.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testsupport.azurite import running_azurite

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
RESULTS = BENCH / "results"
COUNTING = BENCH / "counting"  # its sitecustomize counts every queue request of a child process

# Environment variables the bench handlers and the counting sitecustomize read.
DONE_ENV = "BENCH_DONE"  # completion log: one line "<end epoch> <start epoch> <pid> <body>" per finished message
REQUESTS_ENV = "BENCH_REQUESTS"  # request log: one byte per HTTP request (the method's initial)


@contextmanager
def azurite(workdir: Path) -> Iterator[str]:
    """A fresh in-memory Azurite on a free port; yields its connection string."""
    with running_azurite(workdir) as running:
        yield running.connection_string


def new_queue(conn: str, name: str) -> Any:
    from azure.storage.queue import QueueClient

    client = QueueClient.from_connection_string(conn, name)
    client.create_queue()
    return client


def fill(client: Any, bodies: list[str], threads: int = 16) -> float:
    """Send every body (in parallel); returns the seconds it took."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(client.send_message, bodies))
    return time.perf_counter() - started


def visible_count(client: Any) -> int:
    """Messages visible now (peek sees only visible ones, at most 32)."""
    return len(list(client.peek_messages(max_messages=32)))


def approximate_count(client: Any) -> int:
    return int(client.get_queue_properties().approximate_message_count or 0)


@dataclass(frozen=True)
class Completion:
    time: float  # when the handler finished
    started: float  # when it began
    pid: int
    body: str


class CompletionLog:
    """The file bench handlers append one line to per finished message (O_APPEND, one write each)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[Completion]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            end, start, pid, body = line.split(" ", 3)
            out.append(Completion(float(end), float(start), int(pid), body))
        return out

    def count(self) -> int:
        if not self.path.exists():
            return 0
        with self.path.open("rb") as fh:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 16), b""))

    def seconds_for_all(self, n: int, label: object) -> float:
        """From the first handler start to the last handler end; raises unless exactly n distinct messages completed."""
        completions = self.read()
        if (unique := len({c.body for c in completions})) != n:
            raise RuntimeError(f"{label}: {unique} of {n} messages completed")
        return max(c.time for c in completions) - min(c.started for c in completions)

    def wait_for(self, n: int, timeout: float, alive: subprocess.Popen[bytes] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while self.count() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.count()} of {n} completions after {timeout}s")
            if alive is not None and alive.poll() is not None:
                raise RuntimeError(f"the process under test exited with {alive.returncode} after {self.count()} of {n}")
            time.sleep(0.02)


def record_completion(body: str, started: float | None = None) -> None:
    """Append "<end> <start> <pid> <body>" to the completion log (one write: lines never interleave)."""
    path = os.environ.get(DONE_ENV)
    if not path:
        return
    end = time.time()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{end:.6f} {started or end:.6f} {os.getpid()} {body}\n".encode())
    finally:
        os.close(fd)


def wait_until_empty(client: Any, timeout: float = 10.0) -> None:
    """Until the queue holds nothing (spot-supervisor deletes after the handler returned), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while approximate_count(client) and time.monotonic() < deadline:
        time.sleep(0.01)


def request_count(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def child_env(**extra: str) -> dict[str, str]:
    """This environment without SPOT_*/systemd variables, the repo (so bench.*) importable, plus extra."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SPOT_", "BENCH_")) and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env["PYTHONPATH"] = str(REPO)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def counted(env: dict[str, str], requests: Path) -> dict[str, str]:
    """The same environment with every azure-core request of the child counted into `requests`."""
    return {**env, "PYTHONPATH": os.pathsep.join([str(COUNTING), env["PYTHONPATH"]]), REQUESTS_ENV: str(requests)}


def spawn(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A child in its own process group (so the whole tree can be signalled), stderr+stdout to log."""
    with log.open("ab") as fh:
        return subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


HOLDING = "drained; holding until "  # the supervisor's line once drained for an eviction


def holding(log: Path) -> bool:
    """After an eviction the supervisor holds, without workers, until the VM goes; here nothing takes the VM."""
    return HOLDING in log.read_text(errors="replace")


def end_when_holding(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> int | None:
    """The evicted supervisor's exit code: once it holds, stopped as the VM's shutdown would; None at the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return proc.returncode
        if holding(log):
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                return None
        time.sleep(0.02)
    return None


def stop_tree(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Signal the process (the tool's own shutdown), then SIGKILL its whole group if it lingers."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_text(log: Path, text: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> float:
    """Wait until `text` appears in the log; returns time.monotonic() when it was seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return time.monotonic()
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before {text!r}:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.01)
    raise TimeoutError(f"no {text!r} in {log} after {timeout}s")


def tree_memory(pid: int) -> dict[str, float]:
    """RSS of the parent, mean RSS of its children, and PSS of the whole tree (MB).

    PSS splits pages shared after fork between the processes sharing them, so the
    tree's PSS is what the tree really costs; summed RSS would count them N times.
    """
    import psutil

    parent = psutil.Process(pid)
    children = parent.children(recursive=True)
    rss = [c.memory_info().rss for c in children]
    pss = sum(p.memory_full_info().pss for p in [parent, *children])
    return {"parent_rss_mb": parent.memory_info().rss / 2**20,
            "worker_rss_mb": (sum(rss) / len(rss) / 2**20) if rss else 0.0,
            "processes": 1 + len(children),
            "tree_pss_mb": pss / 2**20}


def pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (q in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def machine() -> dict[str, Any]:
    import psutil

    cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    return {"cpus": len(os.sched_getaffinity(0)), "cpu_model": cpu_model, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "kernel": platform.release(), "load_average_1m": round(os.getloadavg()[0], 2),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def save(name: str, data: dict[str, Any], path: Path | None = None) -> Path:
    target = path or RESULTS / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"machine": machine(), **data}, indent=2) + "\n")
    print(f"results: {target}")
    return target
