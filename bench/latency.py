"""Latency: the bare SDK loop, spot-supervisor and Celery when every queue response is delayed.

    .venv/bin/python -m bench.latency [--delays 0,5,10,20] [--workloads noop,sleep20] [--processes 2]
                                      [--baseline REF] [--repeat 1] [--scale 1.0] [--combine JSON...]

On Azure each queue request is a network round trip; on Azurite over loopback
it costs a few milliseconds. A delay proxy (testsupport/proxy.py, in this
process) sits between each tool and a fresh Azurite and holds every response
for +0, +5, +10 or +20 ms: the kernel here has no netem. The messages are put
on the queue directly, not through the proxy.

Tools, N processes each (2 by default): `bare` (bench/bare_loop.py: receive 32,
run, delete, one after the other), `ours` (`spot-supervisor run`, shipped
defaults), `ours-up` (scale-up mode: one worker process with N threads) and
`celery` (prefork, kombu's Azure transport; bench/celery_app.py).
`--baseline REF` adds `today` (and `today-up`): spot-supervisor as it was at
git REF (extracted with git archive, run with the same venv), so the change is
measured side by side with what it changes. Workloads: `noop`, and `sleep20` (20 ms of waiting:
a handler that leaves the two cores to the queue calls around it; the ideal is
N × 50 msg/s).

Per run: msg/s = messages / (last handler end − first handler start); requests
per message = every HTTP request of the tool's processes (bench/counting) until
the queue was empty ("steady": only those from the first completed message on,
leaving out start-up: queue creation, the first one-message receives); CPU per message = CPU time (user + system) of the tool's
whole process tree from its first completed message until the queue was
empty, divided by the messages (start-up excluded). The best of --repeat runs
is reported. Prints a table and writes bench/results/latency.json; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.common import (
    REPO,
    CompletionLog,
    azurite,
    child_env,
    counted,
    request_count,
    save,
    stop_tree,
    wait_until_empty,
)
from bench.throughput import Setup, enqueue, start_tool
from testsupport.azurite import connection_string
from testsupport.proxy import FaultProxy

DELAYS_MS = (0, 5, 10, 20)
# No deeper: Azurite's own cost per request grows with the queue's depth (bench/azurite_depth: a delete takes
# 3.6 ms at 600 messages, 6.5 ms at 1,000), and a deeper no-op run measures Azurite, not the tools. 600 of 20 ms
# keep the tail (one worker left with its last batch while the other has none) to a few percent of the run.
MESSAGES = {"noop": 400, "sleep20": 600}
IDEAL_PER_PROCESS = {"sleep20": 50.0}  # msg/s one process could do if the queue cost nothing
TOOLS = ("bare", "ours", "ours-up", "celery")


@dataclass(frozen=True)
class Row:
    tool: str  # bare | ours | today | ours-up | today-up | celery
    workload: str
    delay_ms: int


@dataclass(frozen=True)
class Result:
    row: Row
    messages: int
    seconds: float
    rate: float
    requests_per_message: float
    steady_requests_per_message: float  # from the first completed message on: start-up requests left out
    cpu_ms_per_message: float
    proxied_requests: int  # what went through the proxy (the same requests, counted on the wire)


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its descendants so far, exited ones that were waited for included
    (their time is in their parent's children_* fields). A parent that has exited but not been waited
    for still reads (a zombie keeps its counters)."""
    total = 0.0
    try:
        top = psutil.Process(pid)
        processes = [top, *top.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    for process in processes:
        try:
            t = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def extract(ref: str, into: Path) -> Path:
    """The source tree at git REF, for the `today` rows."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "worker", "supervisor"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def measure(row: Row, workdir: Path, n: int, processes: int, baseline: Path | None) -> Result:
    tool, _, mode = row.tool.partition("-")
    setup = Setup("ours" if tool == "today" else tool, row.workload, *((1, processes) if mode == "up" else (processes, 1)))
    with azurite(workdir) as direct:
        port = int(direct.split("127.0.0.1:")[1].split("/")[0])
        with FaultProxy(port, delay_s=row.delay_ms / 1000) as proxy:
            queue = f"lat{uuid.uuid4().hex[:12]}"
            client = enqueue(setup, direct, queue, [f"{row.workload}-{i:06d}" for i in range(n)])
            done = CompletionLog(workdir / f"{queue}.done")
            requests = workdir / f"{queue}.requests"
            env = child_env(BENCH_DONE=str(done.path))
            if tool == "today":
                assert baseline is not None
                env["PYTHONPATH"] = os.pathsep.join([str(baseline), str(REPO)])  # its worker/supervisor, our bench
            proc = start_tool(setup, connection_string(proxy.port), queue, counted(env, requests), workdir / f"{queue}.log")
            try:
                alive = proc if row.tool != "bare" else None
                done.wait_for(1, timeout=60, alive=alive)
                cpu_at_first, requests_at_first = tree_cpu_s(proc.pid), request_count(requests)
                done.wait_for(n, timeout=60 + n * 0.5 / processes, alive=alive)
                wait_until_empty(client)
                cpu = tree_cpu_s(proc.pid) - cpu_at_first
                sent = request_count(requests)
                proxied = proxy.stats.requests
            finally:
                stop_tree(proc, signal.SIGTERM if setup.tool != "celery" else signal.SIGQUIT)
    seconds = done.seconds_for_all(n, row)
    return Result(row, n, seconds, n / seconds, sent / n, (sent - requests_at_first) / n, 1000 * cpu / n, proxied)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", default=",".join(map(str, DELAYS_MS)), help="ms added to every response")
    parser.add_argument("--workloads", default="noop,sleep20")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--baseline", metavar="REF", help="also run spot-supervisor as of this git ref (rows `today`)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the fastest is reported")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the message counts")
    parser.add_argument("--combine", type=Path, nargs="*", default=[], metavar="JSON",
                        help="also count the runs of these earlier results files (with --repeat 0: only them)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/latency.json)")
    args = parser.parse_args()
    tools = args.tools.split(",")
    for ours in ("ours-up", "ours") if args.baseline else ():
        if ours in tools:
            tools.insert(tools.index(ours) + 1, ours.replace("ours", "today"))
    rows = [Row(tool, workload, int(delay)) for delay in args.delays.split(",") for workload in args.workloads.split(",")
            for tool in tools]
    runs: dict[Row, list[Result]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="spot-latency-") as tmp:
        baseline = extract(args.baseline, Path(tmp) / "baseline") if args.baseline and args.repeat else None
        for repeat in range(args.repeat):
            for i, row in enumerate(rows if repeat % 2 == 0 else rows[::-1]):
                n = max(20, round(MESSAGES[row.workload] * args.scale))
                workdir = Path(tmp) / f"r{repeat}-{i}"
                workdir.mkdir()
                result = measure(row, workdir, n, args.processes, baseline)
                runs[row].append(result)
                print(f"  run {repeat + 1}: +{row.delay_ms:>2} ms {row.workload:<8} {row.tool:<8} {result.rate:7.1f} msg/s "
                      f"{result.requests_per_message:.3f} ({result.steady_requests_per_message:.3f}) req/msg "
                      f"{result.cpu_ms_per_message:.2f} CPU ms/msg", flush=True)
    for path in args.combine:
        for run in json.loads(path.read_text())["runs"]:
            earlier = Result(**{**run, "row": Row(**run["row"])})
            if earlier.row in runs:
                runs[earlier.row].append(earlier)
    best = {row: max(found, key=lambda r: r.rate) for row, found in runs.items()}
    print(f"\n{'delay':>6} {'load':<8} {'tool':<8} {'msg/s':>8} {'vs bare':>8} {'of ideal':>8} {'req/msg':>8} {'steady':>7} "
          f"{'CPU ms/msg':>10}")
    for row in rows:
        result = best[row]
        bare = best.get(Row("bare", row.workload, row.delay_ms))
        ideal = IDEAL_PER_PROCESS.get(row.workload)
        vs_bare = f"{result.rate / bare.rate:7.2f}x" if bare else "-"
        of_ideal = f"{result.rate / (ideal * args.processes):7.0%}" if ideal else "-"
        print(f"+{row.delay_ms:>3} ms {row.workload:<8} {row.tool:<8} {result.rate:8.1f} {vs_bare:>8} {of_ideal:>8} "
              f"{result.requests_per_message:8.3f} {result.steady_requests_per_message:7.3f} {result.cpu_ms_per_message:10.2f}")
    save("latency", {"processes": args.processes, "repeat": min(len(found) for found in runs.values()), "baseline": args.baseline,
                     "load_average_1m_end": round(os.getloadavg()[0], 2),
                     "best": [asdict(best[row]) for row in rows],
                     "runs": [asdict(r) for found in runs.values() for r in found]}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
