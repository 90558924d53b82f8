"""Eviction timing over N simulated evictions with work in flight, and messages lost (must be 0).

Per round, on a fresh queue (of a fresh Azurite) of M sample messages (checkpointing CPU work, the round
number in each body): a supervisor with 2 workers, an eviction notice from the IMDS
simulator once work is under way (at a random point of the poll cycle), then the
supervisor drains, acknowledges and exits. Meanwhile the queue is polled every ~5 ms
until every message of the round that is not completed is visible again. Then a
"replacement VM" supervisor (no events) finishes that round's queue.

Prints p50/p95/max of: notice → every worker stopped receiving, drain start → every
worker stopped receiving, last worker exit → acknowledgement, notice → acknowledgement,
notice → released messages visible again; and the message accounting over all rounds.

With --cloud aws or gcp the notice comes from that cloud's metadata simulator (an EC2 Spot
instance-action two minutes ahead; a Compute Engine preemption) and there is no acknowledgement.

Run: .venv/bin/python -m bench.eviction_timing [--cloud azure|aws|gcp] [--rounds 20] [--poll 1.0] [--messages 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import Any, Union

from bench.common import (
    approximate_count,
    azurite,
    child_env,
    end_when_holding,
    fill,
    holding,
    new_queue,
    pct,
    save,
    spawn,
    stop_tree,
    visible_count,
)
from supervisor.simulator.aws import AwsMetadata
from supervisor.simulator.gcp import GcpMetadata
from supervisor.simulator.metadata_http import MetadataServer
from supervisor.simulator.server import ImdsSimulator

Simulator = Union[ImdsSimulator, MetadataServer]

WORKERS = 2
CHUNKS = 10
CHUNK_MS = 20
NOTICE_S = 30.0  # NotBefore of the simulated eviction, as on Azure
AWS_NOTICE_S = 120.0  # an EC2 Spot instance-action's time
PEEK_MAX = 32  # peek_messages returns at most 32: the release check sees the whole queue only up to that
RELEASE_POLL_S = 0.005
RELEASE_TIMEOUT_S = 30.0
IN_FLIGHT_TIMEOUT_S = 60.0
EXIT_TIMEOUT_S = 60.0
FINISH_TIMEOUT_S = 120.0
COMMAND = [sys.executable, "-m", "supervisor", "run"]

METRICS = {  # Round attribute → printed name
    "notice_to_stopped_s": "notice -> every worker stopped receiving",
    "drain_to_stopped_s": "drain start -> every worker stopped receiving",
    "exit_to_ack_s": "last worker exit -> acknowledgement",
    "notice_to_ack_s": "notice -> acknowledgement",
    "notice_to_released_s": "notice -> released messages visible again",
}


@dataclass
class Round:
    number: int
    queue: str
    exit_code: int | None = None
    notice_to_stopped_s: float | None = None
    drain_to_stopped_s: float | None = None
    exit_to_ack_s: float | None = None
    notice_to_ack_s: float | None = None
    notice_to_released_s: float | None = None
    completed_before_notice: int = 0
    completed_by_evicted: int = 0  # unique messages completed before the replacement started
    visible_when_released: int | None = None
    problems: list[str] = field(default_factory=list)


# --- reading what the processes wrote ------------------------------------------------------------------


def completions(results: Path, round_no: int) -> list[dict[str, Any]]:
    """The sample handler's records for this round's messages (complete lines only: a write may be under way)."""
    if not results.exists():
        return []
    lines = results.read_text().split("\n")[:-1]
    records = [json.loads(line) for line in lines]
    return [r for r in records if json.loads(r["body"])["round"] == round_no]


def unique_ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["id"] for r in records}


def drain_timeline(log: str, problems: list[str]) -> dict[str, Any] | None:
    """The supervisor's `drain timeline {json}` record (moments in epoch seconds), the last one in the log."""
    marker = "drain timeline "
    lines = [line for line in log.splitlines() if marker in line]
    if not lines:
        problems.append("no drain timeline in the supervisor log")
        return None
    record: dict[str, Any] = json.loads(lines[-1].split(marker, 1)[1])
    return record


# --- one round -------------------------------------------------------------------------------------------


def supervisor_env(conn: str, queue: str, sim_url: str, results: Path, poll: float, events: str) -> dict[str, str]:
    # The endpoint is the local simulator even with events "none": nothing here may reach 169.254.169.254.
    return child_env(SPOT_QUEUE_CONNECTION_STRING=conn, SPOT_QUEUE_NAME=queue, SPOT_SCALING_WORKERS=str(WORKERS),
                     SPOT_EVENTS_SOURCE=events, SPOT_EVENTS_ENDPOINT=sim_url, SPOT_EVENTS_POLL_INTERVAL_S=str(poll),
                     SPOT_SAMPLE_RESULTS=str(results), SPOT_WORKLOAD_HANDLER="worker.sample:handle")


def bodies(round_no: int, messages: int) -> list[str]:
    return [json.dumps({"round": round_no, "n": i, "chunks": CHUNKS, "chunk_ms": CHUNK_MS}) for i in range(messages)]


def wait_for_work(results: Path, round_no: int, proc: Popen[bytes], problems: list[str]) -> None:
    """Until two messages completed: the workers are receiving, so messages are in flight."""
    deadline = time.monotonic() + IN_FLIGHT_TIMEOUT_S
    while len(completions(results, round_no)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            problems.append(f"no work under way (supervisor exit code {proc.poll()}) before the notice")
            return
        time.sleep(0.02)


def wait_for_release(queue: Any, results: Path, round_no: int, messages: int, noticed_at: float,
                     proc: Popen[bytes], log: Path) -> tuple[float, int] | None:
    """(seconds after the notice, visible count) from when visible + completed covered every message for good.

    "For good": a worker that has not seen the notice yet may take visible messages
    again, so the answer is the start of the last stretch in which the condition held,
    polled until the supervisor exited or holds without workers (nothing receives after that). Completions are
    read before the peek: a message completed in between was invisible at the peek, so
    it is counted at most once; the other order could count a message seen visible,
    then received and completed. None if the condition did not hold at the timeout.
    """
    since: float | None = None
    visible = 0
    while time.time() - noticed_at < RELEASE_TIMEOUT_S:
        exited = proc.poll() is not None or holding(log)
        done = len(unique_ids(completions(results, round_no)))
        visible = visible_count(queue)
        if done + visible < messages:
            since = None
        elif since is None:
            since = time.time()
        if since is not None and exited:
            return since - noticed_at, visible
        time.sleep(RELEASE_POLL_S)
    return None if since is None else (since - noticed_at, visible)  # released, but the supervisor lingers (reported apart)


def read_drain_log(log: str, noticed_at: float, result: Round, acknowledged: bool = True) -> None:
    timeline = drain_timeline(log, result.problems)
    if timeline is None:
        return
    if not str(timeline["reason"]).startswith("Preempt"):
        result.problems.append(f"drained for {timeline['reason']!r}, not the Preempt")
    started, stopped = timeline["started_at"], timeline["stopped_receiving_at"]
    if stopped is not None:
        result.drain_to_stopped_s = max(0.0, stopped - started)
        result.notice_to_stopped_s = max(0.0, stopped - noticed_at)
    else:
        result.problems.append("no worker reported that it stopped receiving")
    if timeline["acknowledged_at"] is not None and timeline["drained_at"] is not None:
        result.exit_to_ack_s = timeline["acknowledged_at"] - timeline["drained_at"]
    elif acknowledged:
        result.problems.append("the drain timeline has no acknowledgement")


def read_ack(sim: ImdsSimulator, event_id: str, noticed_at: float, result: Round) -> None:
    acks = sim.acks()
    if not acks or acks[-1]["body"] != {"StartRequests": [{"EventId": event_id}]}:
        result.problems.append(f"no acknowledgement of {event_id} (acks: {acks})")
        return
    result.notice_to_ack_s = acks[-1]["time"] - noticed_at


def give_notice(sim: Simulator) -> str:
    """An eviction notice from the simulator; the event id the supervisor will drain for."""
    if isinstance(sim, ImdsSimulator):
        return str(sim.simulate_eviction(delay_s=NOTICE_S)["EventId"])
    if isinstance(sim.model, AwsMetadata):
        return f"aws-spot-terminate-{sim.model.simulate_eviction(delay_s=AWS_NOTICE_S)['time']}"
    assert isinstance(sim.model, GcpMetadata)
    sim.model.simulate_eviction()
    return "gcp-preempted"


def evict(conn: str, sim: Simulator, work: Path, results: Path, args: argparse.Namespace, result: Round) -> Any:
    """The evicted VM's part of a round; returns the round's queue client."""
    queue = new_queue(conn, result.queue)
    fill(queue, bodies(result.number, args.messages))
    log_path = work / f"round-{result.number}.log"
    proc = spawn(COMMAND, supervisor_env(conn, result.queue, sim.url, results, args.poll, args.cloud), log_path)
    try:
        wait_for_work(results, result.number, proc, result.problems)
        result.completed_before_notice = len(unique_ids(completions(results, result.number)))
        time.sleep(random.uniform(0, args.poll))  # the notice lands anywhere in the poll cycle
        event_id = give_notice(sim)
        noticed_at = time.time()
        released = wait_for_release(queue, results, result.number, args.messages, noticed_at, proc, log_path)
        if released is None:
            result.problems.append(f"uncompleted messages not all visible again {RELEASE_TIMEOUT_S:.0f}s after the notice")
        else:
            result.notice_to_released_s, result.visible_when_released = released
        result.exit_code = end_when_holding(proc, log_path, EXIT_TIMEOUT_S)
        if result.exit_code is None:
            result.problems.append(f"supervisor neither holding nor gone {EXIT_TIMEOUT_S:.0f}s after the notice")
    finally:
        stop_tree(proc)  # a no-op once it exited
    if result.exit_code not in (0, None):
        result.problems.append(f"supervisor exit code {result.exit_code}")
    read_drain_log(log_path.read_text(errors="replace"), noticed_at, result, isinstance(sim, ImdsSimulator))
    if isinstance(sim, ImdsSimulator):
        read_ack(sim, event_id, noticed_at, result)
    result.completed_by_evicted = len(unique_ids(completions(results, result.number)))
    return queue


def finish(conn: str, sim: Simulator, work: Path, results: Path, args: argparse.Namespace, result: Round) -> None:
    """A replacement VM (no events) runs until every message of the round completed, then stops (SIGTERM)."""
    env = supervisor_env(conn, result.queue, sim.url, results, args.poll, "none")
    proc = spawn(COMMAND, env, work / f"round-{result.number}-replacement.log")
    try:
        deadline = time.monotonic() + FINISH_TIMEOUT_S
        while len(unique_ids(completions(results, result.number))) < args.messages:
            if proc.poll() is not None or time.monotonic() > deadline:
                result.problems.append(f"replacement stopped short (exit code {proc.poll()}) of finishing the queue")
                break
            time.sleep(0.05)
    finally:
        stop_tree(proc)


def left_on(conn: str, queue: Any) -> dict[str, int]:
    """Messages still on the round's queue and its poison queue (invisible ones included)."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.storage.queue import QueueClient

    poison = QueueClient.from_connection_string(conn, f"{queue.queue_name}-poison")
    try:
        poisoned = approximate_count(poison)
    except ResourceNotFoundError:
        poisoned = 0
    return {"queue": approximate_count(queue), "poison": poisoned}


def print_round(result: Round, results: Path) -> None:
    def ms(value: float | None) -> str:
        return "   -   " if value is None else f"{value * 1000:7.1f}"

    done = len(unique_ids(completions(results, result.number)))
    print(f"round {result.number + 1:2d}: notice→stopped {ms(result.notice_to_stopped_s)} ms, "
          f"exit→ack {ms(result.exit_to_ack_s)} ms, notice→ack {ms(result.notice_to_ack_s)} ms, "
          f"notice→released {ms(result.notice_to_released_s)} ms ({result.visible_when_released} visible, "
          f"{result.completed_by_evicted} done by the evicted VM), {done} done in all"
          + "".join(f"\n    PROBLEM: {p}" for p in result.problems), flush=True)


# --- the whole run ---------------------------------------------------------------------------------------


def summarize(rounds: list[Round]) -> dict[str, dict[str, Any]]:
    summary = {}
    for key in METRICS:
        values = [v for v in (getattr(r, key) for r in rounds) if v is not None]
        summary[key.removesuffix("_s")] = {"n": len(values), **({
            "p50_ms": pct(values, 0.5) * 1000, "p95_ms": pct(values, 0.95) * 1000, "max_ms": max(values) * 1000} if values else {})}
    return summary


def account(rounds: list[Round], results: Path, left: dict[str, int], messages: int) -> dict[str, int]:
    records = [r for x in rounds for r in completions(results, x.number)]
    unique = len(unique_ids(records))
    enqueued = messages * len(rounds)
    return {"enqueued": enqueued, "unique_completed": unique, "duplicates": len(records) - unique,
            "resumed_from_checkpoint": sum(1 for r in records if int(r["resumed_from"]) > 0),
            "left_on_queues": left["queue"], "poisoned": left["poison"],
            "lost": enqueued - unique - left["queue"] - left["poison"]}


def print_summary(args: argparse.Namespace, summary: dict[str, dict[str, Any]], messages: dict[str, int], rounds: list[Round]) -> None:
    print()
    print(f"{args.rounds} evictions on {args.cloud}, events.poll_interval_s = {args.poll}, {WORKERS} workers, "
          f"{args.messages} messages a round, "
          f"sample handler {CHUNKS} x {CHUNK_MS} ms chunks")
    for key, name in METRICS.items():
        stats = summary[key.removesuffix("_s")]
        if not stats["n"]:
            print(f"{name:48s} no value")
            continue
        print(f"{name:48s} p50 {stats['p50_ms']:8.1f} ms   p95 {stats['p95_ms']:8.1f} ms   max {stats['max_ms']:8.1f} ms"
              + (f"   ({stats['n']} of {len(rounds)} rounds)" if stats["n"] < len(rounds) else ""))
    print(f"messages: {messages['enqueued']} enqueued, {messages['unique_completed']} completed, {messages['duplicates']} duplicates, "
          f"{messages['resumed_from_checkpoint']} resumed from a checkpoint, {messages['left_on_queues']} left on the queues, "
          f"{messages['poisoned']} poisoned, lost = {messages['lost']}")
    failed = [r.number + 1 for r in rounds if r.problems]
    if failed:
        print(f"rounds with problems: {failed}")


def run(args: argparse.Namespace, work: Path) -> tuple[list[Round], dict[str, int]]:
    results = work / "results.jsonl"
    rounds: list[Round] = []
    left = {"queue": 0, "poison": 0}
    sim: Simulator = {"azure": lambda: ImdsSimulator(vm_name="vm-spot-07"), "aws": lambda: MetadataServer(AwsMetadata()),
                      "gcp": lambda: MetadataServer(GcpMetadata())}[args.cloud]()
    with sim:
        for round_no in range(args.rounds):
            result = Round(round_no, f"bench-evict-{round_no}")
            rounds.append(result)
            # A fresh Azurite per round: its queue GC sweeps every extent a minute after the last sweep, and
            # once a few thousand checkpoint writes have piled up it blocks its event loop for over 10 s.
            (work / f"azurite-{round_no}").mkdir()
            with azurite(work / f"azurite-{round_no}") as conn:
                queue = evict(conn, sim, work, results, args, result)
                if isinstance(sim, ImdsSimulator):
                    sim.reset()
                else:
                    sim.model.control("POST", "/simulate/reset", {})
                finish(conn, sim, work, results, args, result)
                for key, n in left_on(conn, queue).items():
                    left[key] += n
            print_round(result, results)
    return rounds, left


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cloud", choices=("azure", "aws", "gcp"), default="azure", help="whose notices (default azure)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--poll", type=float, default=1.0, help="events.poll_interval_s (default 1, as shipped)")
    parser.add_argument("--messages", type=int, default=30, help=f"on each round's queue, at most {PEEK_MAX}")
    parser.add_argument("--json", type=Path, help="results file (default bench/results/eviction_timing.json)")
    args = parser.parse_args()
    if not 1 <= args.messages <= PEEK_MAX:
        parser.error(f"--messages must be 1..{PEEK_MAX}: the release check peeks at most {PEEK_MAX} messages")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main() -> int:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="spot-bench-evict-"))
    print(f"logs: {work}", flush=True)
    rounds, left = run(args, work)
    summary = summarize(rounds)
    messages = account(rounds, work / "results.jsonl", left, args.messages)
    print_summary(args, summary, messages, rounds)
    save("eviction_timing" if args.cloud == "azure" else f"eviction_timing_{args.cloud}", {
        "config": {"cloud": args.cloud, "rounds": args.rounds, "poll_interval_s": args.poll,
                   "messages_per_round": args.messages, "workers": WORKERS,
                   "chunks": CHUNKS, "chunk_ms": CHUNK_MS, "notice_s": NOTICE_S, "release_poll_s": RELEASE_POLL_S},
        "rounds": [asdict(r) for r in rounds],
        "summary": {**summary, "messages": messages},
    }, args.json)
    return 0 if messages["lost"] == 0 and not any(r.problems for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
