"""Programs as handlers (`[workload] command`): real programs under a real `spot-supervisor run`,
real signals, a real Azurite queue.

Each test kills everything its supervisor started when it ends, the programs' own
sessions included, whatever it asserted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from azure.storage.queue import QueueClient
from nvidia_smi_standin import install, uuids

from testsupport.azurite import Azurite
from testsupport.harness import REPO, SPAWNED, SUPERVISOR, Supervisor, child_env, gone, program_env
from testsupport.queues import message_count, visible_ids
from testsupport.waiting import wait_until
from worker.message import Codec
from worker.queue.poisoned import read_poisoned

PROGRAMS = REPO / "tests" / "programs"
EXAMPLE = REPO / "examples" / "render_frames.sh"



def read_pids(path: Path) -> list[int] | None:
    return [int(p) for p in path.read_text().split()] if path.exists() else None


def stored_state(queue: QueueClient) -> list[object]:
    """The checkpoint each visible message carries (peek: nothing is received)."""
    codec = Codec("none")
    return [codec.open(m.content, m.id)[0].state for m in queue.peek_messages(max_messages=32)]


def poisoned_bodies(poison: QueueClient) -> list[str]:
    """The original bodies on the poison queue (peek: nothing is received)."""
    return [read_poisoned(m.content)[0] for m in poison.peek_messages(max_messages=32)]


# --- outcomes by exit status -------------------------------------------------------------------------


def test_exit_status_decides_done_released_failed_and_poison(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                             tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.txt"
    ids = {body: queue.send_message(body).id for body in ("ok", "release", "fail", "killed")}
    env = program_env(azurite, queue_name, str(PROGRAMS / "outcome.sh"), queue_max_dequeue_count="2",
                      queue_retry_delay_s="0.1", scaling_workers="2")
    env["PROG_EVENTS"] = str(events)
    sup = supervisors(env)
    poison = azurite.queue(f"{queue_name}-poison")

    def runs() -> dict[str, list[int]]:
        counts: dict[str, list[int]] = {body: [] for body in ids}
        for line in events.read_text().splitlines() if events.exists() else []:
            _, dequeue_count, body = line.split()
            counts[body].append(int(dequeue_count))
        return counts

    wait_until(lambda: message_count(queue) == 0, 40, lambda: f"the queue to be empty; runs {runs()}; log:\n{sup.log()[-3000:]}")
    assert sorted(poisoned_bodies(poison)) == ["fail", "killed"]
    reasons = sorted(str(note.reason) for _, note in (read_poisoned(m.content) for m in poison.peek_messages(32)) if note)
    assert reasons[0].endswith("last: ProgramFailed: exit code 3") and reasons[1].endswith("killed by signal SIGKILL")
    done = runs()
    assert done["ok"] == [1]
    # 75 three times, then 0: with max_dequeue_count 2, counted as failures it would have been poisoned.
    assert done["release"] == [1, 2, 3, 4]
    assert done["fail"] == [1, 2] and done["killed"] == [1, 2]
    log = sup.log()
    assert f"message {ids['fail']} stderr: failing on purpose" in log
    assert "exit code 3" in log and "killed by signal SIGKILL" in log
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_timeout_kills_a_run_and_counts_as_a_failure(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                     tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    queue.send_message("slow")
    env = program_env(azurite, queue_name, str(PROGRAMS / "outcome.sh"), workload_timeout_s="1",
                      queue_max_dequeue_count="1")
    env["PROG_EVENTS"] = str(tmp_path / "events.txt")
    sup = supervisors(env)
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    wait_until(lambda: poisoned_bodies(poison) == ["slow"], 20, lambda: sup.log()[-3000:])
    assert "ran longer than workload.timeout_s (1s): killed" in sup.log()
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_checkpoint_file_is_stored_like_ctx_checkpoint(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                      tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    ids = {body: queue.send_message(body).id for body in ('{"a": [1, "two"]}', "{not json", "large")}
    env = program_env(azurite, queue_name, str(PROGRAMS / "checkpointer.sh"))
    env["PROG_OUT"] = str(out)
    sup = supervisors(env)
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"every message to be done; log:\n{sup.log()[-3000:]}")
    given = {body: (out / mid).read_text().strip() for body, mid in ids.items()}
    assert given == {'{"a": [1, "two"]}': '{"a": [1, "two"]}', "{not json": "none", "large": "none"}
    log = sup.log()
    assert f"message {ids['{not json']}: checkpoint file is not valid JSON" in log
    assert f"checkpoint would make message {ids['large']}" in log and "nothing was stored" in log
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- drain: stop signal, checkpoint, release, resume elsewhere ------------------------------------


def test_drain_stops_the_program_which_checkpoints_and_another_supervisor_resumes(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    frames_log = tmp_path / "frames.txt"
    message_id = queue.send_message("25").id
    env = program_env(azurite, queue_name, str(EXAMPLE), shutdown_drain_timeout_s="20")
    env.update(RENDER_FRAME_S="0.3", RENDER_LOG=str(frames_log))

    def frames() -> list[int]:
        return [int(line.split()[1]) for line in frames_log.read_text().splitlines()] if frames_log.exists() else []

    first = supervisors(env)
    wait_until(lambda: len(frames()) >= 3, 20, lambda: f"three frames; log:\n{first.log()[-3000:]}")
    first.send(signal.SIGTERM)
    assert first.wait(15) == 0
    done_first = frames()
    assert done_first == list(range(len(done_first))) and len(done_first) < 25
    log = first.log()
    assert f"message {message_id} stdout: drain: stopping at frame {len(done_first)} of 25" in log
    assert "before the deadline" in log  # it read SPOT_DEADLINE_FILE
    assert "ended (exit code 75); releasing the message" in log
    # Released at once (not after the 30-s lease), carrying the last checkpoint.
    assert stored_state(queue) == [{"next_frame": len(done_first)}]

    second = supervisors(env)
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"the rest of the frames; log:\n{second.log()[-3000:]}")
    assert frames() == list(range(25)), "a frame was rendered twice or skipped"
    assert f"resuming at frame {len(done_first)} (attempt 2)" in second.log()
    second.send(signal.SIGTERM)
    assert second.wait(10) == 0


def test_the_stop_signal_is_configurable(azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
                                         supervisors: Callable[..., Supervisor]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    message_id = queue.send_message("x").id
    env = program_env(azurite, queue_name, str(PROGRAMS / "usr1.sh"), workload_stop_signal="SIGUSR1")
    env["PROG_OUT"] = str(out)
    sup = supervisors(env)
    wait_until(lambda: (out / f"{message_id}.started").exists(), 10, lambda: f"the program to start; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0
    assert (out / message_id).read_text() == "stopped\n"
    assert "drain, sending SIGUSR1 to the program" in sup.log()


def test_a_program_ignoring_the_stop_signal_dies_with_its_children_at_the_deadline(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    pids_file = tmp_path / "pids"
    message_id = queue.send_message("x").id
    env = program_env(azurite, queue_name, str(PROGRAMS / "stubborn.sh"), shutdown_drain_timeout_s="2")
    env["PROG_PIDS"] = str(pids_file)
    sup = supervisors(env)
    pids = wait_until(lambda: read_pids(pids_file), 10, lambda: f"the program to start; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0
    wait_until(lambda: all(gone(pid) for pid in pids), 5,
               lambda: f"program {pids[0]}, its child {pids[1]} and its escaped child {pids[2]} to be gone")
    log = sup.log()
    assert "deadline: killed 1 running program(s)" in log
    assert visible_ids(queue) == {message_id}, "the message was not released at the deadline"


def test_the_last_checkpoint_is_stored_at_the_deadline(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                       tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    pids_file = tmp_path / "pids"
    queue.send_message("x")
    # A deadline sooner than the first once-a-second look: only the look at the deadline can store it.
    env = program_env(azurite, queue_name, str(PROGRAMS / "stubborn.sh"), shutdown_drain_timeout_s="0.2")
    env["PROG_PIDS"] = str(pids_file)
    sup = supervisors(env)
    wait_until(lambda: read_pids(pids_file), 10, lambda: f"the program to start; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0
    assert stored_state(queue) == [{"step": 1}]


# --- no strays -----------------------------------------------------------------------------------------


def test_sigkill_of_a_worker_kills_its_program_and_the_programs_children(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    pids_file = tmp_path / "pids"
    queue.send_message("x")
    env = program_env(azurite, queue_name, str(PROGRAMS / "stubborn.sh"))
    env["PROG_PIDS"] = str(pids_file)
    sup = supervisors(env)
    pids = wait_until(lambda: read_pids(pids_file), 10, lambda: f"the program to start; log:\n{sup.log()[-3000:]}")
    worker = psutil.Process(pids[0]).ppid()
    assert worker in sup.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: all(gone(pid) for pid in pids), 5,
               lambda: f"program {pids[0]}, its child {pids[1]} and its escaped child {pids[2]} to be gone; "
                       f"log:\n{sup.log()[-3000:]}")
    assert "left behind by a worker" in sup.log()
    wait_until(lambda: not any(psutil.pid_exists(pid) for pid in pids), 5, "the supervisor to reap them (no zombies)")
    sup.send(signal.SIGQUIT)
    assert sup.wait(10) == 0


def test_sigkill_of_the_supervisor_kills_the_programs_too(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                         tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    pids_file = tmp_path / "pids"
    message_id = queue.send_message("x").id
    env = program_env(azurite, queue_name, str(PROGRAMS / "stubborn.sh"))
    env["PROG_PIDS"] = str(pids_file)
    sup = supervisors(env)
    pids = wait_until(lambda: read_pids(pids_file), 10, lambda: f"the program to start; log:\n{sup.log()[-3000:]}")
    worker = psutil.Process(pids[0]).ppid()
    sup.send(signal.SIGKILL)  # the worker learns it from the kernel (parent-death signal) and abandons at once
    wait_until(lambda: all(gone(pid) for pid in [worker, *pids]), 10,
               lambda: f"worker {worker}, program {pids[0]} and its children {pids[1:]} to be gone; log:\n{sup.log()[-3000:]}")
    assert visible_ids(queue) == {message_id}, "the message was not released"


def test_sigkill_of_a_worker_kills_what_a_python_handler_started(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    pid_file = tmp_path / "pid"
    queue.send_message("x")
    env = program_env(azurite, queue_name, "", workload_handler="testsupport.program_handlers:start_a_child")
    env["PROG_PIDS"] = str(pid_file)
    sup = supervisors(env)
    child = wait_until(lambda: read_pids(pid_file), 10, lambda: f"the handler to start; log:\n{sup.log()[-3000:]}")[0]
    worker = psutil.Process(child).ppid()
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: gone(child), 5, lambda: f"the handler's child {child} to be gone; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGQUIT)
    assert sup.wait(10) == 0


# --- input and output ----------------------------------------------------------------------------------


def test_a_64_kib_body_arrives_on_stdin_with_the_spot_environment(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    body = "".join(chr(33 + i % 90) for i in range(64 * 1024))
    message = queue.send_message(body)
    env = program_env(azurite, queue_name, f"{PROGRAMS / 'stdin_copy.sh'}")
    env["PROG_OUT"] = str(out)
    sup = supervisors(env)
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the message to be done; log:\n{sup.log()[-3000:]}")
    assert (out / message.id).read_text() == body
    seen = dict(line.split("=", 1) for line in (out / f"{message.id}.env").read_text().splitlines())
    assert seen["SPOT_MESSAGE_ID"] == message.id and seen["SPOT_DEQUEUE_COUNT"] == "1"
    assert seen["SPOT_INSERTED_ON"].startswith(str(message.inserted_on.year))
    assert seen["SPOT_CHECKPOINT_FILE"].endswith("checkpoint.json") and seen["SPOT_DEADLINE_FILE"]
    assert "SPOT_QUEUE_CONNECTION_STRING" not in seen, "the supervisor's own settings leaked into the program"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_a_program_printing_a_lot_is_logged_line_by_line_in_bounded_memory(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    message_id = queue.send_message("x").id
    sup = supervisors(program_env(azurite, queue_name, str(PROGRAMS / "chatty.sh")))
    worker = next(iter(sup.wait_for_workers(1)))
    wait_until(lambda: message_count(queue) == 0, 60, lambda: f"the message to be done; log:\n{sup.log()[-3000:]}")
    peak_kb = int(next(line for line in Path(f"/proc/{worker}/status").read_text().splitlines()
                       if line.startswith("VmHWM:")).split()[1])
    assert peak_kb < 150 * 1024, f"the worker's memory peaked at {peak_kb} kB for a 200 MB output line"
    lines = sup.log().splitlines()
    cut = [line for line in lines if f"message {message_id} stdout: xxxx" in line]
    assert len(cut) == 1 and cut[0].endswith("x [line cut]") and cut[0].count("x") < 4200
    numbered = [line.rsplit(": ", 1)[1] for line in lines if f"message {message_id} stderr: " in line]
    assert numbered == [str(i) for i in range(1, 20001)]
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- scale-up ------------------------------------------------------------------------------------------


def test_scale_up_runs_one_program_per_thread(azurite: Azurite, queue: QueueClient, queue_name: str,
                                              tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.txt"
    for i in range(4):
        queue.send_message(str(i))
    env = program_env(azurite, queue_name, str(PROGRAMS / "overlap.sh"), workload_mode="scale-up",
                      scaling_threads_per_core="4")
    env["PROG_EVENTS"] = str(events)
    sup = supervisors(env)
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"every message to be done; log:\n{sup.log()[-3000:]}")
    runs = [line.split() for line in events.read_text().splitlines()]
    assert len(runs) == 4
    assert len({parent for _, _, parent, _ in runs}) == 1, "scale-up ran programs from more than one worker process"
    spans = sorted((float(a), float(b)) for a, b, _, _ in runs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two programs overlapped: {spans}"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_gpu_pinning_applies_to_programs(azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
                                         supervisors: Callable[..., Supervisor]) -> None:
    events = tmp_path / "events.txt"
    install(tmp_path / "bin", gpus=2)
    for i in range(6):
        queue.send_message(str(i))
    env = program_env(azurite, queue_name, str(PROGRAMS / "gpu_seen.sh"), scaling_workers="0",
                      scaling_workers_per_gpu="1", scaling_memory_per_worker_mb="0")
    env.update(PATH=str(tmp_path / "bin"), PROG_EVENTS=str(events))  # only the stand-in nvidia-smi
    env.pop("CUDA_VISIBLE_DEVICES", None)
    sup = supervisors(env)
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"every message to be done; log:\n{sup.log()[-3000:]}")
    pinned = {int(m[1]): m[4] for m in SPAWNED.finditer(sup.log())}  # worker pid -> its GPU's UUID
    assert sorted(pinned.values()) == sorted(uuids(2))
    seen = [line.split() for line in events.read_text().splitlines()]
    assert len(seen) == 6 and all(cuda == pinned[int(worker)] for cuda, worker in seen), (seen, pinned)
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "not executable", "not on PATH"])
def test_a_command_that_cannot_run_exits_78_with_one_line(azurite: Azurite, queue_name: str, tmp_path: Path,
                                                          kind: str) -> None:
    script = tmp_path / "render.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    command = {"missing": f"{tmp_path}/nope --fast", "not executable": f"{script} --fast",
               "not on PATH": "no-such-render-tool --fast"}[kind]
    env = program_env(azurite, queue_name, command)
    proc = subprocess.run([*SUPERVISOR, "run"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: workload.command: "), proc.stderr
    assert command.split()[0] in lines[0]


def test_plan_says_which_handler_runs(azurite: Azurite, tmp_path: Path) -> None:
    env = child_env(azurite, workload_command="/bin/true --fast")
    out = subprocess.run([*SUPERVISOR, "plan", "--json"], env=env, capture_output=True, text=True, timeout=30, check=True)
    plan = json.loads(out.stdout)
    assert plan["command"] == "/bin/true --fast" and plan["handler"] is None
    text = subprocess.run([*SUPERVISOR, "plan"], env=env, capture_output=True, text=True, timeout=30, check=True).stdout
    assert "runs:     program /bin/true --fast" in text


def test_python_m_worker_refuses_a_missing_command(azurite: Azurite, queue_name: str) -> None:
    env = program_env(azurite, queue_name, "/no/such/program")
    proc = subprocess.run([sys.executable, "-m", "worker"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 78
    assert "workload.command: /no/such/program: no such file" in proc.stderr
