"""Chaos: no message lost when the whole process tree is SIGKILLed at random moments, or evicted.

    .venv/bin/python -m bench.chaos [--mode kill|evict] [--messages 1000] [--cycles 12] [--workers 2]
                                    [--tool ours|celery] [--seed N] [--json PATH]

Messages with unique ids ("m-00042") and a handler that records each completion.
kill:  start `spot-supervisor run`, SIGKILL its whole process group at a random moment
       (some during start-up, some mid-batch), check nothing of the group survived,
       restart at once; `--cycles` times.
evict: the same, but each disruption is an eviction notice from the local IMDS
       simulator: the supervisor must drain and acknowledge by itself, then hold until
       stopped (it stays up until the VM goes), and exit 0.
Then one last supervisor runs until the queue is empty and every id is accounted for.

Reported per mode: completions, duplicates (a handler finished but its delete never
happened: expected after kills, ~0 after evictions), messages parked in the poison
queue, and lost (never completed and nowhere on a queue: must be 0).

--tool celery runs the kill mode against Celery on kombu's Azure transport with the
same harness (kombu deletes a message when it receives it, so Celery loses some).

This file is also the handler module the workers import ("bench.chaos:handle").
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import common
from bench.common import (
    DONE_ENV,
    CompletionLog,
    approximate_count,
    child_env,
    end_when_holding,
    kill_group,
    record_completion,
    spawn,
    stop_tree,
)
from worker import Context, Interrupted, Message
from worker.sample import burn

CHUNKS = 3
CHUNK_S = 0.010
KILL_VISIBILITY_S = 6  # a killed tree's messages come back this soon (leases renewed at half of it while handlers run)
EVICT_VISIBILITY_S = 60  # the default: drains release their messages, nothing waits for a lease
DISRUPT_AFTER_S = (0.3, 4.0)  # from start: "ready:" comes ~0.4-0.7 s after the start here, so some land in start-up
NOTICE_S = 30.0  # eviction NotBefore after the notice, as on Azure
CELERY_QUIET_S = 5.0  # Celery: the queue is empty and nothing completed for this long = done (its lost tasks never will)
VM_NAME = "vm-chaos"


# --- the handler (imported by the workers) -------------------------------------------------------------


def handle(message: Message, ctx: Context) -> None:
    """A little CPU work in chunks, checkpointed after each; stops between chunks when draining."""
    started = time.time()
    state = ctx.state or {"chunk": 0, "digest": hashlib.sha256(message.body.encode()).hexdigest()}
    digest = bytes.fromhex(state["digest"])
    for chunk in range(state["chunk"], CHUNKS):
        if ctx.draining:
            raise Interrupted()
        digest = burn(digest, CHUNK_S)
        ctx.checkpoint({"chunk": chunk + 1, "digest": digest.hex()})
    record_completion(message.body, started)


# --- the harness ----------------------------------------------------------------------------------------


@dataclass
class Target:
    """One tool under test on its own fresh queue: how to start it, and where its results go."""

    mode: str
    tool: str
    argv: list[str]
    env: dict[str, str]
    queue: Any  # QueueClient
    poison: Any | None  # QueueClient of "<name>-poison" (ours only)
    done: CompletionLog
    workdir: Path
    visibility_s: int  # how long a received message stays invisible if its holder dies
    workers: int

    @property
    def label(self) -> str:
        return f"{self.tool}-{self.mode}"


@dataclass
class Cycle:
    n: int
    at_s: float  # the disruption, this long after the start
    phase: str  # "start-up" (no "ready:" logged yet) or "running"
    completed: int  # unique ids completed once this cycle was over
    records: int
    exit_code: int | None = None
    exit_after_notice_s: float | None = None  # evict: notice -> the supervisor exited
    acked: bool | None = None
    survivors: list[int] = field(default_factory=list)  # pids of the group still alive afterwards (must be none)

    @property
    def problems(self) -> list[str]:
        out = [f"process(es) {self.survivors} of the group still alive"] if self.survivors else []
        if self.exit_code not in (None, 0):
            out.append(f"exit code {self.exit_code}")
        if self.acked is False:
            out.append("no acknowledgement received")
        return out


@dataclass
class Report:
    tool: str
    mode: str
    messages: int
    disruptions: int
    workers: int
    visibility_timeout_s: int
    records: int
    unique_completed: int
    duplicates: int  # records - unique
    ids_completed_twice_or_more: int
    in_poison: int
    left_in_queue: int
    lost: int
    never_completed: list[str]
    lost_ids: list[str]
    poisoned_ids: list[str]
    completed_and_poisoned: int
    final_run_s: float
    final_timed_out: bool
    wall_s: float
    cycles: list[dict[str, Any]]
    problems: list[str]


def supervisor_target(mode: str, conn: str, workdir: Path, workers: int, sim_url: str | None) -> Target:
    name = f"chaos-{mode}"
    queue = common.new_queue(conn, name)
    poison = common.new_queue(conn, f"{name}-poison")  # created now so it can be counted; the workers would create it
    done = CompletionLog(workdir / f"{name}-done.log")
    visibility = KILL_VISIBILITY_S if mode == "kill" else EVICT_VISIBILITY_S
    env = child_env(SPOT_QUEUE_CONNECTION_STRING=conn, SPOT_QUEUE_NAME=name, SPOT_SCALING_WORKERS=str(workers),
                    SPOT_WORKLOAD_HANDLER="bench.chaos:handle", SPOT_QUEUE_VISIBILITY_TIMEOUT_S=str(visibility),
                    SPOT_QUEUE_IDLE_POLL_MAX_S="1", **{DONE_ENV: str(done.path)})
    if sim_url is None:
        env["SPOT_EVENTS_SOURCE"] = "none"
    else:  # the VM name comes from the simulator's instance metadata, as on Azure
        env.update(SPOT_EVENTS_SOURCE="azure", SPOT_EVENTS_ENDPOINT=sim_url, SPOT_EVENTS_POLL_INTERVAL_S="1")
    return Target(mode, "ours", [sys.executable, "-m", "supervisor", "run"], env, queue, poison, done, workdir, visibility, workers)


def celery_target(conn: str, workdir: Path, workers: int) -> Target:
    from bench.celery_app import broker_url

    name = "chaos-celery"
    queue = common.new_queue(conn, name)
    done = CompletionLog(workdir / f"{name}-done.log")
    env = child_env(BENCH_BROKER=broker_url(conn), BENCH_QUEUE=name, **{DONE_ENV: str(done.path)})
    argv = [str(Path(sys.executable).with_name("celery")), "-A", "bench.celery_app", "worker", "--pool", "prefork",
            "--concurrency", str(workers), "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "warning"]
    # 30 s: the service's default visibility timeout, which kombu's receive uses (between its receive and its delete)
    return Target("kill", "celery", argv, env, queue, None, done, workdir, 30, workers)


def enqueue(target: Target, ids: list[str], conn: str) -> float:
    if target.tool == "ours":
        return common.fill(target.queue, ids)
    return enqueue_celery(ids, conn, target.env["BENCH_QUEUE"])


def enqueue_celery(ids: list[str], conn: str, queue_name: str) -> float:
    from bench.celery_app import send_tasks

    started = time.perf_counter()
    send_tasks(conn, queue_name, "cpu20", ids)
    return time.perf_counter() - started


def survivors(pgid: int, timeout: float = 5.0) -> list[int]:
    """Live processes of the group once `timeout` passed without it emptying (zombies awaiting a reaper don't count)."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc.pid)
            except (psutil.Error, ProcessLookupError):
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def sleep_alive(proc: Any, seconds: float, log: Path) -> None:
    """Sleep, but fail at once if the process under test exits by itself meanwhile."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before its disruption:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))


def phase(log: Path) -> str:
    return "running" if "ready: " in log.read_text(errors="replace") else "start-up"


def progress(target: Target) -> tuple[int, int]:
    records = target.done.read()
    return len({r.body for r in records}), len(records)


def kill_cycle(target: Target, n: int, rng: random.Random) -> Cycle:
    log = target.workdir / f"{target.label}-{n:02d}.log"
    proc = spawn(target.argv, target.env, log)
    started = time.monotonic()
    sleep_alive(proc, rng.uniform(*DISRUPT_AFTER_S), log)
    at = round(time.monotonic() - started, 3)
    seen = phase(log) if target.tool == "ours" else "-"
    kill_group(proc)
    left = survivors(proc.pid)
    completed, records = progress(target)
    return Cycle(n, at, seen, completed, records, survivors=left)


def evict_cycle(target: Target, sim: Any, n: int, rng: random.Random) -> Cycle:
    log = target.workdir / f"{target.label}-{n:02d}.log"
    proc = spawn(target.argv, target.env, log)
    started = time.monotonic()
    sleep_alive(proc, rng.uniform(*DISRUPT_AFTER_S), log)
    at = round(time.monotonic() - started, 3)
    seen = phase(log)
    event = sim.simulate_eviction(delay_s=NOTICE_S)
    code = end_when_holding(proc, log, NOTICE_S + 30)  # drained and holding: stopped as the VM's end would
    if code is None:  # did not drain by itself: record it, and clean up for the next cycle
        kill_group(proc)
    exited = round(time.monotonic() - started - at, 3)
    expected = {"StartRequests": [{"EventId": event["EventId"]}]}
    acked = any(a["body"] == expected for a in sim.acks())
    left = survivors(proc.pid)
    sim.reset()
    completed, records = progress(target)
    return Cycle(n, at, seen, completed, records, exit_code=code, exit_after_notice_s=exited, acked=acked, survivors=left)


def queue_count(client: Any | None) -> int:
    return 0 if client is None else approximate_count(client)


def finished(target: Target, messages: int, queued: int, accounted: int, quiet_s: float) -> bool:
    if queued > 0:
        return False
    if target.tool == "celery":  # what it lost never completes: done once the empty queue stays quiet
        return accounted >= messages or quiet_s >= CELERY_QUIET_S
    return accounted >= messages


def final_run(target: Target, messages: int) -> tuple[float, bool, str | None]:
    """Run until the queue is empty and every message is accounted for, or nothing moved for the stall limit.
    Returns (seconds, timed out, why the process under test ended early if it did)."""
    stall_limit = target.visibility_s * 4 + 60.0
    log = target.workdir / f"{target.label}-final.log"
    proc = spawn(target.argv, target.env, log)
    started = last_change = time.monotonic()
    last: tuple[int, int, int] | None = None
    timed_out, ended = False, None
    try:
        while True:
            completed, _ = progress(target)
            state = (completed, queue_count(target.queue), queue_count(target.poison))
            now = time.monotonic()
            if state != last:
                last, last_change = state, now
            if finished(target, messages, state[1], state[0] + state[2], now - last_change):
                break
            if now - last_change > stall_limit:
                timed_out = True
                break
            if proc.poll() is not None:
                ended = f"exited with {proc.returncode} before the queue was done"
                break
            time.sleep(0.5)
    finally:
        elapsed = time.monotonic() - started
        stop_tree(proc)
    return elapsed, timed_out, ended


def bodies(client: Any | None) -> list[str]:
    """Every message's producer text, taken off a queue nobody consumes any more (the end of a mode)."""
    from azure.core.exceptions import ResourceNotFoundError

    from worker.message import Codec

    if client is None:
        return []
    codec = Codec("none")
    out: list[str] = []
    try:
        while True:
            page = list(client.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=600))
            if not page:
                return out
            out.extend(codec.open(m.content or "", m.id)[1] for m in page)  # checkpointed ones are envelopes
    except ResourceNotFoundError:
        return out


def report(target: Target, ids: list[str], cycles: list[Cycle], final: tuple[float, bool, str | None], wall_s: float) -> Report:
    records = target.done.read()
    completions = Counter(r.body for r in records)
    poisoned = set(bodies(target.poison))
    left = set(bodies(target.queue))
    never = [i for i in ids if i not in completions]
    lost = [i for i in never if i not in poisoned and i not in left]
    problems = [f"cycle {c.n}: {p}" for c in cycles for p in c.problems]
    if final[1]:
        problems.append("final run: timed out (nothing moved for the stall limit)")
    if final[2]:
        problems.append(f"final run: {final[2]}")
    return Report(
        tool=target.tool, mode=target.mode, messages=len(ids), disruptions=len(cycles),
        workers=target.workers, visibility_timeout_s=target.visibility_s, records=len(records), unique_completed=len(completions),
        duplicates=len(records) - len(completions), ids_completed_twice_or_more=sum(1 for c in completions.values() if c > 1),
        in_poison=len(poisoned & set(ids)), left_in_queue=len(left & set(ids)), lost=len(lost), never_completed=never,
        lost_ids=lost, poisoned_ids=sorted(poisoned), completed_and_poisoned=len(poisoned & set(completions)),
        final_run_s=round(final[0], 2), final_timed_out=final[1], wall_s=round(wall_s, 2),
        cycles=[asdict(c) for c in cycles], problems=problems)


def run_mode(target: Target, ids: list[str], cycles: int, conn: str, rng: random.Random, sim: Any | None) -> Report:
    print(f"\n== {target.tool}, {target.mode}: {len(ids)} messages, {cycles} disruptions, queue {target.queue.queue_name}", flush=True)
    print(f"enqueued in {enqueue(target, ids, conn):.1f}s", flush=True)
    started = time.monotonic()
    done: list[Cycle] = []
    for n in range(1, cycles + 1):
        cycle = kill_cycle(target, n, rng) if sim is None else evict_cycle(target, sim, n, rng)
        done.append(cycle)
        print(describe_cycle(target, cycle), flush=True)
    final = final_run(target, len(ids))
    result = report(target, ids, done, final, time.monotonic() - started)
    print_report(result)
    return result


def describe_cycle(target: Target, c: Cycle) -> str:
    what = "SIGKILL of the whole tree" if target.mode == "kill" else "eviction notice"
    line = f"cycle {c.n:2d}: {what} {c.at_s:5.2f}s after start ({c.phase})"
    if target.mode == "evict":
        line += f", exit {c.exit_code} {c.exit_after_notice_s:.2f}s after the notice, ack {'yes' if c.acked else 'NO'}"
    line += f"; {c.completed} completed so far ({c.records} records)"
    return line + "".join(f"  PROBLEM: {p}" for p in c.problems)


def print_report(r: Report) -> None:
    print(f"final run: {r.final_run_s:.1f}s{' (TIMED OUT)' if r.final_timed_out else ''}; wall {r.wall_s:.1f}s")
    print(f"messages {r.messages}: {r.unique_completed} completed ({r.records} records), duplicates {r.duplicates} "
          f"({r.ids_completed_twice_or_more} ids more than once), in poison {r.in_poison}, left in queue {r.left_in_queue}, "
          f"LOST {r.lost}")
    if r.duplicates:
        print("  duplicates: a handler finished and recorded its completion, but the process died before the delete "
              "(or the drain released it): at-least-once, handlers must be idempotent")
    if r.in_poison:
        print(f"  in poison (parked, not lost): {', '.join(r.poisoned_ids[:20])}{' ...' if r.in_poison > 20 else ''} — "
              "a killed attempt cannot be told from a crash, so a message held by max_dequeue_count killed trees is poisoned")
    if r.completed_and_poisoned:
        print(f"  {r.completed_and_poisoned} completed AND in poison (killed between the poison copy and the delete)")
    if r.never_completed:
        print(f"  never completed: {', '.join(r.never_completed[:30])}{' ...' if len(r.never_completed) > 30 else ''}")
    if r.lost and r.tool == "celery":
        print("  lost: kombu's Azure transport deletes a message when it receives it, before the task runs; "
              "a killed worker loses what it had prefetched or was running")
    for problem in r.problems:
        print(f"  PROBLEM: {problem}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("kill", "evict"), help="default: both, one after the other, each on its own queue")
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--cycles", type=int, default=12, help="disruptions (the issue asks for at least 10)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tool", choices=("ours", "celery"), default="ours", help="celery: kill mode only")
    parser.add_argument("--seed", type=int, help="for the random disruption times (default: random, printed)")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/chaos[-celery].json)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) even when nothing went wrong")
    args = parser.parse_args()
    if args.tool == "celery" and args.mode == "evict":
        parser.error("--tool celery has no eviction handling to test: kill mode only")
    modes = [args.mode] if args.mode else (["kill"] if args.tool == "celery" else ["kill", "evict"])
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    ids = [f"m-{i:05d}" for i in range(args.messages)]
    workdir = Path(tempfile.mkdtemp(prefix="spot-chaos-"))
    print(f"seed {seed}, work directory {workdir}, {args.workers} workers, load average {os.getloadavg()[0]:.2f}", flush=True)

    reports = []
    with common.azurite(workdir) as conn:
        for mode in modes:
            reports.append(run_one(mode, args, conn, workdir, ids, rng))
    data = {"seed": seed, "parameters": {"messages": args.messages, "cycles": args.cycles, "workers": args.workers, "tool": args.tool,
                                         "chunks": CHUNKS, "chunk_ms": CHUNK_S * 1000, "disrupt_after_s": DISRUPT_AFTER_S},
            "runs": [asdict(r) for r in reports]}
    common.save("chaos" if args.tool == "ours" else "chaos-celery", data, args.json)
    failed = [r for r in reports if r.problems or (r.tool == "ours" and r.lost)]
    if failed or args.keep:
        print(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def run_one(mode: str, args: argparse.Namespace, conn: str, workdir: Path, ids: list[str], rng: random.Random) -> Report:
    if args.tool == "celery":
        return run_mode(celery_target(conn, workdir, args.workers), ids, args.cycles, conn, rng, None)
    if mode == "kill":
        return run_mode(supervisor_target(mode, conn, workdir, args.workers, None), ids, args.cycles, conn, rng, None)
    from supervisor.simulator.server import ImdsSimulator

    sim = ImdsSimulator(vm_name=VM_NAME).start()
    try:
        return run_mode(supervisor_target(mode, conn, workdir, args.workers, sim.url), ids, args.cycles, conn, rng, sim)
    finally:
        sim.stop()


if __name__ == "__main__":
    sys.exit(main())
