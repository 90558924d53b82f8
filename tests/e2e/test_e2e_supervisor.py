"""The supervisor as an operator sees it: `spot-supervisor run` as a real process,
real signals, real worker processes, a real Azurite queue.

Every test starts the supervisor in its own session and kills that whole process
group when it ends, so no worker outlives a test, whatever it asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.handlers import IMPORT_DELAY_ENV, IMPORTED_ENV, RECORD_ENV, read_json_lines, read_records, succeeded_ids
from testsupport.harness import RECORD_HANDLER, Supervisor, child_env, run_plan
from testsupport.queues import message_count, visible_ids
from testsupport.waiting import wait_until

# --- helpers ---------------------------------------------------------------------------------------


def done_events(path: Path) -> list[dict[str, Any]]:
    return [e for e in read_records(path, "end") if e["outcome"] == "succeeded"]


def enqueue(queue: QueueClient, bodies: list[str]) -> list[str]:
    return [queue.send_message(body).id for body in bodies]


def sleepy_bodies(n: int, seconds: float, cooperative: bool = False) -> list[str]:
    """Handlers that sleep `seconds`; cooperative ones raise Interrupted as soon as ctx.draining."""
    return [json.dumps({"sleep": seconds, "ignore_drain": not cooperative, "n": i}) for i in range(n)]


def sleepy_env(azurite: Azurite, queue_name: str, events: Path, **spot: str) -> dict[str, str]:
    defaults = {"queue_batch_size": "1", "queue_visibility_timeout_s": "3", "shutdown_drain_timeout_s": "5",
                "shutdown_kill_grace_s": "1", "queue_idle_poll_max_s": "0.2",
                "queue_prefetch_s": "0"}  # batch_size is what a worker takes, as the tests say
    env = child_env(azurite, queue_name=queue_name, workload_handler=RECORD_HANDLER, **{**defaults, **spot})
    env[RECORD_ENV] = str(events)
    return env


def spawned_pids(log: str) -> list[int]:
    return [int(line.split("spawned worker ", 1)[1].split()[0]) for line in log.splitlines() if "spawned worker " in line]


# --- 1. scale-out ----------------------------------------------------------------------------------


def test_scale_out_processes_in_several_workers(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    results = tmp_path / "results.jsonl"
    ids = enqueue(queue, [json.dumps({"chunks": 1, "chunk_ms": 30, "n": i}) for i in range(40)])
    env = child_env(azurite, queue_name=queue_name, scaling_workers="4", queue_batch_size="2",
                    queue_idle_poll_max_s="0.2", shutdown_drain_timeout_s="5")
    env["SPOT_SAMPLE_RESULTS"] = str(results)
    sup = supervisors(env)
    assert len(sup.wait_for_workers(4)) == 4

    def all_done() -> bool:
        return {line["id"] for line in read_json_lines(results)} >= set(ids)
    wait_until(all_done, 30, "every message to be processed")
    wait_until(lambda: message_count(queue) == 0, 10, "the queue to be empty (every message deleted)")

    lines = read_json_lines(results)
    pids = {line["pid"] for line in lines}
    assert len(pids) >= 2, f"all 40 messages ran in one process: {pids}"
    assert pids <= set(spawned_pids(sup.log())), "completions came from processes the supervisor did not spawn"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- 2. a worker killed mid-message ------------------------------------------------------------------


def test_sigkill_of_a_worker_respawns_it_and_loses_nothing(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                          tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    ids = enqueue(queue, sleepy_bodies(4, 1.0))
    sup = supervisors(sleepy_env(azurite, queue_name, events, scaling_workers="2", queue_visibility_timeout_s="2"))
    first = sup.wait_for_workers(2)

    started = wait_until(lambda: [e for e in read_records(events) if e["event"] == "start"], 10, "a handler to start")
    victim_pid, victim_msg = started[0]["pid"], started[0]["id"]
    assert victim_msg not in succeeded_ids(events)
    os.kill(victim_pid, signal.SIGKILL)

    replacement = wait_until(lambda: sup.worker_pids() - first, 5, "a new worker after the SIGKILL")
    assert victim_pid not in sup.worker_pids()
    assert len(sup.wait_for_workers(2)) == 2
    wait_until(lambda: succeeded_ids(events) >= set(ids), 20, "every message, the killed one included, to be done")
    wait_until(lambda: message_count(queue) == 0, 10, "the queue to be empty")

    redone = [e for e in done_events(events) if e["id"] == victim_msg]
    assert redone and all(e["pid"] != victim_pid for e in redone)
    assert max(e["dequeue_count"] for e in redone) >= 2, "the killed message was not received a second time"
    log = sup.log()
    assert f"worker {victim_pid} died (signal SIGKILL)" in log
    assert replacement <= set(spawned_pids(log))
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- 3. SIGTERM drains --------------------------------------------------------------------------------


def test_sigterm_drains_and_leaves_the_rest_on_the_queue(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                        tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    # Every other handler returns early (Interrupted) once ctx.draining; the rest run to the end.
    bodies = [json.dumps({"sleep": 0.3, "ignore_drain": i % 2 != 0, "n": i}) for i in range(40)]
    ids = enqueue(queue, bodies)
    # batch_size 8: each worker also holds received-but-unstarted messages when the drain starts.
    sup = supervisors(sleepy_env(azurite, queue_name, events, scaling_workers="2", queue_batch_size="8",
                           queue_visibility_timeout_s="30"))
    sup.wait_for_workers(2)
    wait_until(lambda: len(succeeded_ids(events)) >= 3, 15, "a few messages to be done")

    sent = time.monotonic()
    sup.send(signal.SIGTERM)
    assert sup.wait(5 + 1) == 0
    assert time.monotonic() - sent < 5, "SIGTERM drain took longer than drain_timeout_s"

    late = [e for e in read_records(events) if e["event"] == "start" and e["draining"]]
    assert not late, f"{len(late)} message(s) started after the drain began instead of being released"
    done = succeeded_ids(events)
    assert len(done) < len(ids), "the drain test needs work left over"
    assert message_count(queue) == len(ids) - len(done)
    # Released at once, not after the 30 s lease: every leftover message can be received right now.
    assert visible_ids(queue) == set(ids) - done
    assert "drained in" in sup.log()


def test_sigterm_with_a_stubborn_handler_exits_at_the_deadline(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                              tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    ids = enqueue(queue, sleepy_bodies(2, 60.0, cooperative=False))
    sup = supervisors(sleepy_env(azurite, queue_name, events, scaling_workers="1", shutdown_drain_timeout_s="2",
                           queue_visibility_timeout_s="30"))
    wait_until(lambda: read_records(events), 10, "the handler to start")
    sent = time.monotonic()
    sup.send(signal.SIGTERM)
    assert sup.wait(2 + 1 + 2) == 0
    assert 1.8 < time.monotonic() - sent < 2 + 1 + 1, "exited before the drain deadline or long after it"
    assert message_count(queue) == 2
    assert visible_ids(queue) == set(ids), "the running message was not released at the deadline"


# --- 4. SIGKILL of the supervisor --------------------------------------------------------------------


def test_sigkill_of_the_supervisor_leaves_no_worker(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                   tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    ids = enqueue(queue, sleepy_bodies(6, 30.0))
    sup = supervisors(sleepy_env(azurite, queue_name, events, scaling_workers="2", queue_visibility_timeout_s="30"))
    workers = [psutil.Process(pid) for pid in sup.wait_for_workers(2)]
    wait_until(lambda: len(read_records(events)) >= 2, 10, "both workers to be mid-message")

    sup.send(signal.SIGKILL)

    def all_gone() -> bool:
        for proc in workers:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                pass
        return True
    wait_until(all_gone, 2.0, "every worker to exit after the supervisor was killed")
    assert sup.wait(5) == -signal.SIGKILL
    # The workers released what they held on the way out: visible now, not after the 30 s lease.
    assert message_count(queue) == len(ids)
    assert visible_ids(queue) == set(ids)


# --- 5. plan under a faked cgroup quota and CPU affinity ----------------------------------------------


def fake_cgroup(tmp_path: Path, cpu_max: str) -> dict[str, str]:
    root = tmp_path / "cgroup"
    (root / "app.slice").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "app.slice" / "cpu.max").write_text(cpu_max + "\n")
    proc_self = tmp_path / "proc-self-cgroup"
    proc_self.write_text("0::/app.slice\n")
    return {"SPOT_CGROUP_ROOT": str(root), "SPOT_PROC_SELF_CGROUP": str(proc_self)}


def test_plan_follows_cgroup_quota_and_affinity(azurite: Azurite, tmp_path: Path,
                                                supervisors: Callable[..., Supervisor]) -> None:
    cpus = len(os.sched_getaffinity(0))
    if cpus < 2:
        pytest.skip("needs at least 2 CPUs to tell a limit from the machine")
    base = child_env(azurite, scaling_memory_per_worker_mb="0", scaling_workers_per_core="1")

    unlimited = run_plan(supervisors, {**base, **fake_cgroup(tmp_path / "a", "max 100000")})
    assert (unlimited["workers"], unlimited["usable_cpus"]) == (cpus, cpus)

    quota = run_plan(supervisors, {**base, **fake_cgroup(tmp_path / "b", "100000 100000")})
    assert (quota["mode"], quota["workers"], quota["threads"], quota["usable_cpus"]) == ("scale-out", 1, 1, 1)
    assert any("cgroup quota 1" in reason for reason in quota["reasons"]), quota["reasons"]

    pinned = run_plan(supervisors, {**base, **fake_cgroup(tmp_path / "c", "max 100000")},
                      preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert (pinned["workers"], pinned["usable_cpus"]) == (1, 1)
    assert any("affinity 1" in reason for reason in pinned["reasons"]), pinned["reasons"]

    up = run_plan(supervisors, {**base, **fake_cgroup(tmp_path / "d", "max 100000"),
                          "SPOT_WORKLOAD_MODE": "scale-up", "SPOT_SCALING_THREADS_PER_CORE": "3"})
    assert (up["mode"], up["workers"], up["threads"]) == ("scale-up", 1, 3 * cpus)

    up_quota = run_plan(supervisors, {**base, **fake_cgroup(tmp_path / "e", "100000 100000"),
                                "SPOT_WORKLOAD_MODE": "scale-up", "SPOT_SCALING_THREADS_PER_CORE": "3"},
                        preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert (up_quota["workers"], up_quota["threads"]) == (1, 3)
    assert any("3 threads_per_core" in reason for reason in up_quota["reasons"]), up_quota["reasons"]


# --- 6. SIGHUP reload -----------------------------------------------------------------------------------


def test_sighup_reloads_the_worker_count_and_survives_a_bad_file(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                                tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    config = tmp_path / "spot.toml"
    workload = f'[workload]\nhandler = "{RECORD_HANDLER}"\n'
    config.write_text(f"[scaling]\nworkers = 2\n{workload}")
    ids = enqueue(queue, sleepy_bodies(24, 0.4))
    env = sleepy_env(azurite, queue_name, events)
    for key in ("SPOT_SCALING_WORKERS", "SPOT_WORKLOAD_HANDLER"):  # the file must decide
        env.pop(key, None)
    sup = supervisors(env, "run", "--config", str(config))
    old = sup.wait_for_workers(2)
    wait_until(lambda: len(read_records(events)) >= 2, 10, "work to start")

    config.write_text(f"[scaling]\nworkers = 3\n{workload}")
    sup.send(signal.SIGHUP)

    def three_new() -> set[int] | None:
        pids = sup.worker_pids()
        return pids if len(pids) == 3 and not pids & old else None
    new = wait_until(three_new, 10, lambda: f"3 new workers replacing {old}; log:\n{sup.log()[-3000:]}")
    def reaped() -> bool:
        return all(f"worker {pid} exited (" in sup.log() for pid in old)
    wait_until(reaped, 5, "the old workers to be reaped")
    for pid in old:
        assert f"worker {pid} exited (exit code 0)" in sup.log(), f"old worker {pid} did not drain cleanly"

    wait_until(lambda: succeeded_ids(events) >= set(ids), 30, "every message to be done across the reload")
    wait_until(lambda: message_count(queue) == 0, 10, "the queue to be empty")

    config.write_text(f"[scaling]\nworkers = \"three\"\n{workload}")
    sup.send(signal.SIGHUP)
    wait_until(lambda: "keeping the running configuration" in sup.log(), 5, "the bad reload to be logged")
    time.sleep(1.0)
    assert sup.proc.poll() is None, "a bad configuration on SIGHUP stopped the service"
    assert sup.worker_pids() == new, "a bad configuration on SIGHUP replaced the workers"
    assert "scaling.workers" in sup.log()

    # Valid TOML, but the handler cannot be imported: only the new workers can tell. The service
    # goes back to the running configuration instead of exiting 78.
    config.write_text("[scaling]\nworkers = 4\n[workload]\nhandler = \"nonexistent.module:handle\"\n")
    sup.send(signal.SIGHUP)
    wait_until(lambda: "going back to the previous one" in sup.log(), 10, lambda: f"a rollback; log:\n{sup.log()[-3000:]}")
    assert sup.proc.poll() is None, "a handler typo on SIGHUP stopped the service"
    (late,) = enqueue(queue, sleepy_bodies(1, 0.1))
    wait_until(lambda: late in succeeded_ids(events), 15, "a message to be processed after the rollback")
    assert len(sup.wait_for_workers(3)) == 3, "the rollback did not restore the running worker count"
    # New workers start before the running ones retire: the workers of the good configuration never stopped.
    assert new <= sup.worker_pids(), "the running workers were replaced by a reload that failed"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- 7. scale-up ----------------------------------------------------------------------------------------


def test_scale_up_runs_threads_in_one_process(azurite: Azurite, queue: QueueClient, queue_name: str,
                                              tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    cpus = len(os.sched_getaffinity(0))
    threads = 3 * cpus
    events = tmp_path / "events.jsonl"
    ids = enqueue(queue, sleepy_bodies(2 * threads, 0.5))
    sup = supervisors(sleepy_env(azurite, queue_name, events, workload_mode="scale-up", scaling_threads_per_core="3"))
    (pid,) = sup.wait_for_workers(1)
    wait_until(lambda: succeeded_ids(events) >= set(ids), 30, "every message to be done")
    assert psutil.Process(pid).num_threads() >= threads
    assert sup.worker_pids() == {pid}, "scale-up started more than one worker"

    done = done_events(events)
    assert {e["pid"] for e in done} == {pid}
    starts = {e["id"]: e["t"] for e in read_records(events) if e["event"] == "start"}
    spans = [(starts[e["id"]], e["t"]) for e in done]
    most_at_once = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert most_at_once >= 2, "the handler never ran on two threads at once"
    assert f"1 scale-up worker(s) x {threads} thread(s)" in sup.log()
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- 8. a handler that cannot be imported ------------------------------------------------------------------


def test_unimportable_handler_exits_78_without_a_respawn_storm(azurite: Azurite, queue_name: str, tmp_path: Path,
                                                               supervisors: Callable[..., Supervisor]) -> None:
    sup = supervisors(child_env(azurite, queue_name=queue_name, scaling_workers="2",
                          workload_handler="nonexistent.module:handle"))
    assert sup.wait(10) == 78
    log = sup.log()
    assert any("workload.handler" in line and "nonexistent.module" in line for line in log.splitlines()), log
    assert 1 <= len(spawned_pids(log)) <= 2, f"respawn storm:\n{log}"
    assert "Traceback" not in log


# --- 9. TTIN / TTOU ---------------------------------------------------------------------------------------


def test_ttin_and_ttou_add_and_remove_one_worker(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                 tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    sup = supervisors(sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="2"))
    # Workers by the supervisor's own word: a bare count of its children can catch a short-lived
    # process of another kind between two spawns.
    two = set(wait_until(lambda: spawned_pids(sup.log()) if len(spawned_pids(sup.log())) == 2 else None, 10,
                         what="two workers"))
    sup.wait_for_workers(2)
    sup.send(signal.SIGTTIN)
    three = set(wait_until(lambda: spawned_pids(sup.log()) if len(spawned_pids(sup.log())) == 3 else None, 10,
                           what="a third worker"))
    assert two < three and three <= sup.wait_for_workers(3), sup.log()[-4000:]
    sup.send(signal.SIGTTOU)
    assert sup.wait_for_workers(2) < three
    sup.send(signal.SIGTTOU)
    one = sup.wait_for_workers(1)
    sup.send(signal.SIGTTOU)  # never below one worker
    time.sleep(1.0)
    assert sup.worker_pids() == one
    log = sup.log()
    assert "scaling workers 2 -> 3" in log and "scaling workers 3 -> 2" in log and "scaling workers 2 -> 1" in log
    assert "died" not in log, "a worker removed by TTOU was taken for a crash"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- 10. systemd notify -------------------------------------------------------------------------------------


def test_systemd_notify_ready_status_watchdog_stopping(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                       tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.2)
        received: list[tuple[float, str]] = []

        def collect() -> list[str]:
            while True:
                try:
                    received.append((time.monotonic(), sock.recv(65536).decode()))
                except (TimeoutError, socket.timeout):
                    return [text for _, text in received]

        imported = tmp_path / "imported"
        env = sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="2")
        # The handler takes a second to import: READY must wait for the workers, not just their fork.
        env.update({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000", IMPORT_DELAY_ENV: "1.0",
                    IMPORTED_ENV: str(imported)})
        env.pop("WATCHDOG_PID", None)
        sup = supervisors(env)

        def ready() -> bool:
            return any("READY=1" in text.splitlines() for text in collect())
        wait_until(ready, 10, "READY=1")
        importers = set(map(int, imported.read_text().split())) if imported.exists() else set()
        workers = sup.worker_pids()
        assert len(workers) == 2 and importers == workers, "READY=1 came before every worker had loaded the handler"
        ready_text = next(text for _, text in received if "READY=1" in text.splitlines())
        assert "STATUS=running: 2 worker(s)" in ready_text

        time.sleep(2.0)
        collect()
        pings = [t for t, text in received if text == "WATCHDOG=1"]
        assert len(pings) >= 3, f"expected a WATCHDOG=1 every 0.5 s, got {len(pings)}"
        assert any(text.startswith("STATUS=") for _, text in received)
        assert not any("STOPPING=1" in text for _, text in received)

        sup.send(signal.SIGTERM)
        assert sup.wait(10) == 0
        texts = collect()
        stopping = [text for text in texts if "STOPPING=1" in text.splitlines()]
        assert stopping and "STATUS=draining: SIGTERM" in stopping[0]
        assert sum("READY=1" in text.splitlines() for text in texts) == 1


def test_watchdog_pings_in_time_for_a_short_watchdog_interval(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                              tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(0.1)
        env = sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="1")
        env.update({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})  # WatchdogSec=400ms
        sup = supervisors(env)
        pings: list[float] = []
        until = time.monotonic() + 10
        while len(pings) < 12 and time.monotonic() < until:
            try:
                if sock.recv(65536) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except (TimeoutError, socket.timeout):
                pass
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 12, f"only {len(pings)} WATCHDOG=1 in 10 s"
        assert max(gaps) < 0.4, f"systemd would have killed the service: a {max(gaps):.3f}s gap between pings"
        sup.send(signal.SIGTERM)
        assert sup.wait(10) == 0


# --- 11. SIGQUIT ------------------------------------------------------------------------------------------------


def test_sigquit_stops_fast_and_releases_held_messages(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                       tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.jsonl"
    ids = enqueue(queue, sleepy_bodies(10, 30.0))
    sup = supervisors(sleepy_env(azurite, queue_name, events, scaling_workers="2", queue_batch_size="3",
                           queue_visibility_timeout_s="30", shutdown_drain_timeout_s="20"))
    sup.wait_for_workers(2)
    wait_until(lambda: len(read_records(events)) >= 2, 10, "both workers to be mid-message")
    wait_until(lambda: len(visible_ids_peek(queue)) <= len(ids) - 6, 5, "both workers to hold a full batch")

    sent = time.monotonic()
    sup.send(signal.SIGQUIT)
    assert sup.wait(3) == 0
    assert time.monotonic() - sent < 2.0, "SIGQUIT is a fast stop"
    assert not succeeded_ids(events)
    # Everything the workers held (running and unstarted) is visible at once, not after the 30 s lease.
    assert visible_ids(queue) == set(ids)


def visible_ids_peek(queue: QueueClient) -> list[str]:
    return [m.id for m in queue.peek_messages(max_messages=32)]


# --- 12. limits and liveness (issue 16) ---------------------------------------------------------------------


def test_sighups_are_coalesced_so_one_generation_starts_at_a_time(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                                   tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    env = sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="2")
    env[IMPORT_DELAY_ENV] = "1.0"  # a slow handler import: each generation takes a second to be ready
    sup = supervisors(env)
    wait_until(lambda: "ready:" in sup.log(), 15, "the first workers to be ready")
    most = 0
    for _ in range(20):  # 20 SIGHUPs in 5 s
        sup.send(signal.SIGHUP)
        for _ in range(5):
            most = max(most, len(sup.worker_pids()))
            time.sleep(0.05)
    until = time.monotonic() + 4
    while time.monotonic() < until:
        most = max(most, len(sup.worker_pids()))
        time.sleep(0.05)
    # At most the running generation, one starting and one draining: 3 x 2 workers (42 before coalescing).
    assert most <= 6, f"{most} workers at once"
    sup.wait_for_workers(2, timeout=30)
    assert "reloading again once they are ready" in sup.log()
    sup.send(signal.SIGTERM)
    assert sup.wait(20) == 0


def test_ttin_never_goes_past_max_workers(azurite: Azurite, queue: QueueClient, queue_name: str,
                                          tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    sup = supervisors(sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="1", scaling_max_workers="3"))
    sup.wait_for_workers(1)
    for _ in range(10):
        sup.send(signal.SIGTTIN)
        time.sleep(0.05)
    three = sup.wait_for_workers(3)
    time.sleep(1.5)
    assert sup.worker_pids() == three
    assert "at most scaling.max_workers 3" in sup.log()
    sup.send(signal.SIGTERM)
    assert sup.wait(20) == 0


def test_a_worker_that_stops_answering_is_killed_and_replaced(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                              tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    sup = supervisors(sleepy_env(azurite, queue_name, tmp_path / "events.jsonl", scaling_workers="1",
                           scaling_worker_timeout_s="2"))
    wait_until(lambda: "ready:" in sup.log(), 15, "the worker to be ready")
    [stuck] = sup.wait_for_workers(1)
    os.kill(stuck, signal.SIGSTOP)  # alive, but answers nothing
    wait_until(lambda: f"worker {stuck} sent nothing for" in sup.log(), 10, "the silent worker to be noticed")
    [replacement] = wait_until(lambda: (pids := sup.worker_pids() - {stuck}) and pids, 10, "a replacement worker")
    assert not psutil.pid_exists(stuck) or psutil.Process(stuck).status() == psutil.STATUS_ZOMBIE
    assert "killed for not answering" in sup.log()
    sup.send(signal.SIGTERM)
    assert sup.wait(20) == 0
    assert replacement != stuck


# --- 13. the development tools stay out of the service ---------------------------------------------------


def test_run_never_imports_the_imds_simulator(azurite: Azurite, queue_name: str,
                                              supervisors: Callable[..., Supervisor]) -> None:
    # PYTHONPROFILEIMPORTTIME: the supervisor and its forked workers log every module they import, when they do.
    env = {**child_env(azurite, queue_name=queue_name, scaling_workers="1"), "PYTHONPROFILEIMPORTTIME": "1"}
    sup = supervisors(env)
    sup.wait_for_log("ready:")
    sup.send(signal.SIGTERM)
    assert sup.wait(20) == 0
    imported = [line.rsplit("|", 1)[1].strip() for line in sup.log().splitlines() if line.startswith("import time:")]
    assert "supervisor.service" in imported and "worker.queue.consumer" in imported  # the log does show the run path
    assert [name for name in imported if name.startswith("supervisor.simulator") or name == "http.server"] == []
