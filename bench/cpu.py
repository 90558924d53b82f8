"""CPU per message side by side: the no-SDK floor, the bare SDK loop, and spot-supervisor scale-out and scale-up.

    .venv/bin/python -m bench.cpu [--messages 600] [--warmup 200] [--repeat 3] [--profile]

Each repeat starts one Azurite and runs every loop on a fresh queue of the same
no-op messages (order alternating between repeats):

- floor:       bench/floor_loop.py, one process: keep-alive http.client, Shared Key by hand, Get 32 / Delete each
- bare:        bench/bare_loop.py, one process: the same loop on azure-storage-queue
- ours-out:    `spot-supervisor run`, 1 scale-out worker (supervisor + worker process)
- ours-up:     `spot-supervisor run`, scale-up, 1 process x 4 threads

CPU per message = user + sys of the whole process tree between the moment the
warm-up messages were done and the moment all were done, divided by the
messages done in between; requests per message over the same window (every
HTTP request, bench/counting). The floor loop is the yardstick: each row also
shows its CPU as a multiple of the floor's of the same repeat.

With --profile, one more run of ours-out with cProfile on every thread of the
worker process (bench/counting), summarised by where the time went (tottime per
package, the top functions). cProfile's own overhead inflates the total; the
shares are what it is for.

Prints numbers and writes bench/results/cpu.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import marshal
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    CompletionLog,
    azurite,
    child_env,
    counted,
    fill,
    new_queue,
    request_count,
    save,
    spawn,
    stop_tree,
)
from bench.throughput import Setup, start_tool

LOOPS = ("floor", "bare", "ours-out", "ours-up")
SCALE_UP_THREADS = 4


@dataclass(frozen=True)
class Measured:
    loop: str
    repeat: int
    messages: int  # done within the window
    cpu_ms_per_message: float
    requests_per_message: float
    vs_floor: float  # this repeat's floor = 1


def start(loop: str, conn: str, queue: str, env: dict[str, str], log: Path) -> Any:
    if loop == "floor":
        return spawn([sys.executable, "-m", "bench.floor_loop", "noop"], {**env, "BENCH_CONNECTION": conn, "BENCH_QUEUE": queue}, log)
    setup = {"bare": Setup("bare", "noop", 1), "ours-out": Setup("ours", "noop", 1),
             "ours-up": Setup("ours", "noop", 1, SCALE_UP_THREADS)}[loop]
    return start_tool(setup, conn, queue, env, log)


def tree_cpu_s(pid: int) -> float:
    """user + sys of a process and all its descendants now (including their reaped children)."""
    import psutil

    total = 0.0
    try:
        parent = psutil.Process(pid)
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def measure(loop: str, conn: str, workdir: Path, warmup: int, messages: int,
            extra_env: dict[str, str] | None = None) -> tuple[int, float, int]:
    """(messages in the window, CPU seconds in it, requests in it)."""
    queue = f"cpu{uuid.uuid4().hex[:12]}"
    total = warmup + messages
    fill(new_queue(conn, queue), [f"noop-{i:06d}" for i in range(total)])
    done = CompletionLog(workdir / f"{queue}.done")
    requests = workdir / f"{queue}.requests"
    env = counted(child_env(BENCH_DONE=str(done.path), **(extra_env or {})), requests)
    proc = start(loop, conn, queue, env, workdir / f"{queue}.log")
    first: tuple[int, float, int] | None = None
    deadline = time.monotonic() + 60 + total * 0.05
    try:
        while True:
            count = done.count()
            if first is None and count >= warmup:
                first = (count, tree_cpu_s(proc.pid), request_count(requests))
            if count >= total:
                last = (count, tree_cpu_s(proc.pid), request_count(requests))
                break
            if time.monotonic() > deadline or (proc.poll() is not None and count < total):
                raise RuntimeError(f"{loop}: {count} of {total} done; log:\n{(workdir / f'{queue}.log').read_text()[-2000:]}")
            time.sleep(0.01)
    finally:
        stop_tree(proc)
    assert first is not None
    return last[0] - first[0], last[1] - first[1], last[2] - first[2]


def profile_summary(directory: Path, top: int = 15) -> dict[str, Any]:
    """tottime by package and the top functions, over every profile written to `directory`."""
    merged: dict[Any, Any] = {}
    for path in directory.glob("*.prof"):
        for func, entry in marshal.loads(path.read_bytes()).items():
            old = merged.get(func)
            merged[func] = entry if old is None else (old[0] + entry[0], old[1] + entry[1], old[2] + entry[2], old[3] + entry[3], old[4])
    by_area: dict[str, float] = defaultdict(float)
    for (filename, _, name), (_, _, tottime, _, _) in merged.items():
        by_area[area(filename, name)] += tottime
    total = sum(by_area.values()) or 1.0
    functions = sorted(merged.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return {"total_s": total,
            "by_area": {k: round(v / total, 4) for k, v in sorted(by_area.items(), key=lambda kv: -kv[1])},
            "top": [{"function": pstats.func_std_string(func), "calls": entry[1], "tottime_share": round(entry[2] / total, 4)}
                    for func, entry in functions]}


AREAS = (("azure/core", "azure-core pipeline"), ("azure/storage", "azure-storage-queue (models, XML)"),
         ("requests/", "requests"), ("urllib3/", "urllib3"), ("http/client", "http.client"),
         ("email/", "http.client: header parsing (email)"), ("opentelemetry", "opentelemetry"),
         ("hmac", "signing (hmac)"), ("base64", "signing (base64)"), ("_strptime", "date parsing"), ("json/", "json"),
         ("worker/queue/transport", "ours: lean transport"), ("worker/queue/lean", "ours: lean client"), ("worker/queue", "ours: queue"),
         ("worker/telemetry", "ours: telemetry"), ("worker/", "ours: other"), ("supervisor/", "ours: supervisor"),
         ("bench/", "bench handler"), ("xml/", "xml (stdlib)"), ("threading", "threading"), ("logging", "logging"),
         ("ssl", "ssl"), ("socket", "socket"), ("selectors", "selectors"), ("queue.py", "queue (stdlib)"))


def area(filename: str, name: str) -> str:
    for marker, label in AREAS:
        if marker in filename:
            return label
    if filename == "~":  # C functions: socket send/recv, lock waits, hmac...
        if "hmac" in name or "openssl" in name or "digest" in name:
            return "signing (hmac)"
        if "lock" in name or "wait" in name or "SimpleQueue" in name:
            return "lock waits (C)"
        if "socket" in name or "recv" in name or "send" in name or "select" in name or "poll" in name:
            return "sockets (C)"
        return "other C functions"
    return "other Python"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=600, help="messages counted per run, after the warm-up")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--loops", default=",".join(LOOPS))
    parser.add_argument("--profile", action="store_true", help="also profile ours-out's worker once")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/cpu.json)")
    args = parser.parse_args()
    loops = args.loops.split(",")
    runs: list[Measured] = []
    profile: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="spot-bench-cpu-") as tmp:
        workdir = Path(tmp)
        for repeat in range(args.repeat):
            with azurite(workdir) as conn:
                found: dict[str, tuple[int, float, int]] = {}
                for loop in loops if repeat % 2 == 0 else loops[::-1]:
                    found[loop] = measure(loop, conn, workdir, args.warmup, args.messages)
                    n, cpu, sent = found[loop]
                    print(f"  run {repeat + 1}: {loop:<9} {1000 * cpu / n:6.3f} ms CPU/msg, {sent / n:.3f} req/msg ({n} msgs)", flush=True)
                floor = found.get("floor")
                floor_ms = 1000 * floor[1] / floor[0] if floor else 0.0
                for loop, (n, cpu, sent) in found.items():
                    ms = 1000 * cpu / n
                    runs.append(Measured(loop, repeat + 1, n, ms, sent / n, ms / floor_ms if floor_ms else 0.0))
        if args.profile:
            prof_dir = workdir / "profile"
            prof_dir.mkdir()
            with azurite(workdir) as conn:
                measure("ours-out", conn, workdir, args.warmup, args.messages, {"BENCH_PROFILE": str(prof_dir)})
            time.sleep(0.5)
            profile = profile_summary(prof_dir)
    print(f"\n{'loop':<10} {'CPU ms/msg (range)':>22} {'median':>8} {'x floor (range)':>18} {'req/msg':>8}")
    for loop in loops:
        mine = [r for r in runs if r.loop == loop]
        ms = [r.cpu_ms_per_message for r in mine]
        x = [r.vs_floor for r in mine]
        print(f"{loop:<10} {min(ms):10.3f} – {max(ms):<9.3f} {statistics.median(ms):8.3f} {min(x):8.2f} – {max(x):<7.2f}"
              f" {statistics.median(r.requests_per_message for r in mine):8.3f}")
    if profile:
        print(f"\nwhere ours-out's worker spends its CPU (cProfile, thread CPU time, {profile['total_s']:.2f} s profiled):")
        for name, share in profile["by_area"].items():
            if share >= 0.01:
                print(f"  {share:6.1%}  {name}")
        print("top functions (own time):")
        for entry in profile["top"]:
            print(f"  {entry['tottime_share']:6.1%}  {entry['calls']:>7}  {entry['function']}")
    save("cpu", {"warmup": args.warmup, "messages": args.messages, "repeat": args.repeat,
                 "runs": [asdict(r) for r in runs], "profile": profile}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
