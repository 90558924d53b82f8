"""Attacks by the programs a worker runs (`[workload] command`): on the package's secrets, on the worker
through the run's files, by commands that cannot run, and through their output. Real programs under a real
`spot-supervisor run` (or `python -m worker`), a real Azurite queue, real signals."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.harness import REPO, SUPERVISOR, Supervisor, gone, program_env
from testsupport.hostile.programs import (
    SECRETS_SCANNER,
    drop_all_capabilities,
    hostile_lines,
    lines_with,
    planted_secrets,
    write_python_program,
    write_script,
)
from testsupport.queues import message_count, visible_ids
from testsupport.waiting import wait_until
from worker.message import Message
from worker.programs.command import why_not_runnable
from worker.programs.runner import ProgramHandler

PROGRAMS = REPO / "tests" / "programs"



# --- secrets ---------------------------------------------------------------------------------------------


def scanner_setup(azurite: Azurite, queue_name: str, tmp_path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """(the environment to start with, {name: secret value} the scanner looks for)."""
    planted = planted_secrets()
    account_key = dict(part.split("=", 1) for part in azurite.connection_string.split(";") if "=" in part)["AccountKey"]
    wanted = {**planted, "SPOT_QUEUE_CONNECTION_STRING (its AccountKey)": account_key}
    secrets_file = tmp_path / "secrets"
    secrets_file.write_text("".join(f"{name}={value}\n" for name, value in wanted.items()))
    scanner = write_python_program(tmp_path / "scanner.py", SECRETS_SCANNER)
    return {**program_env(azurite, queue_name, str(scanner)), **planted, "PROG_SECRETS": str(secrets_file)}, wanted


def assert_nothing_found(log: str, wanted: dict[str, str], protected: list[int]) -> None:
    report = list(hostile_lines(log))
    assert report[-1:] == ["done"], report
    assert [line for line in report if line.startswith("LEAK")] == [], report
    for pid in protected:
        looked = [line for line in report if f"/proc/{pid}/" in line]
        assert any(f"/proc/{pid}/environ" in line for line in looked) and any(f"/proc/{pid}/mem" in line for line in looked)
        # Even a reader with every privilege (this test) finds nothing in their environment blocks.
        block = Path(f"/proc/{pid}/environ").read_bytes()
        assert [name for name, value in wanted.items() if value.encode() in block] == []


def test_no_secret_reaches_a_program_or_can_be_read_from_its_worker_or_supervisor(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    env, wanted = scanner_setup(azurite, queue_name, tmp_path)
    queue.send_message("x")
    # Root without capabilities: what any process of the supervisor's uid may read, its programs included
    # (the systemd unit's empty CapabilityBoundingSet makes the service exactly that).
    sup = supervisors(env, preexec_fn=drop_all_capabilities)
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"the scan to end; log:\n{sup.log()[-3000:]}")
    assert_nothing_found(sup.log(), wanted, [next(iter(sup.worker_pids())), sup.pid])
    sup.send(signal.SIGTERM)
    assert sup.wait(15) == 0


def test_no_secret_can_be_read_from_a_standalone_worker(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                        tmp_path: Path) -> None:
    env, wanted = scanner_setup(azurite, queue_name, tmp_path)
    queue.send_message("x")
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdin=subprocess.DEVNULL, stderr=log_file,
                                start_new_session=True, preexec_fn=drop_all_capabilities)
    try:
        wait_until(lambda: message_count(queue) == 0, 30, lambda: f"the scan to end; log:\n{log_path.read_text()[-3000:]}")
        assert_nothing_found(log_path.read_text(), wanted, [proc.pid])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


# --- the checkpoint file --------------------------------------------------------------------------------


def limit_memory() -> None:
    """preexec_fn: a worker reading /dev/zero without bound fails at 4 GiB instead of taking the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize(("kind", "logged"), [("fifo", "checkpoint file is a FIFO, not a regular file; not stored"),
                                              ("dev_zero", "checkpoint file is a symbolic link, not a regular file; not stored"),
                                              ("huge", "checkpoint file is over ")])
def test_a_hostile_checkpoint_file_is_not_read_and_stalls_nothing(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor],
        kind: str, logged: str) -> None:
    """The run's outcome is its exit status (0: done); the checkpoint is not stored, with one line saying why;
    the worker goes on with the next message, and a drain is not held up."""
    out = tmp_path / "out"
    out.mkdir()
    env = program_env(azurite, queue_name, str(PROGRAMS / "hostile_checkpoint.sh"), queue_max_dequeue_count="1")
    env["PROG_OUT"] = str(out)
    hostile = queue.send_message(kind).id
    sup = supervisors(env, preexec_fn=limit_memory)
    pid_file = out / f"{hostile}.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 15,
                         lambda: f"the program to start; log:\n{sup.log()[-3000:]}"))
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the message to be done; log:\n{sup.log()[-3000:]}")
    wait_until(lambda: gone(pid), 5, f"program {pid} to be gone with its attempt")
    later = queue.send_message("ok").id
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the next message {later} to be done; log:\n{sup.log()[-3000:]}")
    log = sup.log()
    assert len(lines_with(log, f"message {hostile}: checkpoint file")) == 1, log[-3000:]
    assert logged in log
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    assert message_count(poison) == 0
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- commands that cannot run ----------------------------------------------------------------------------


def broken_commands(tmp_path: Path) -> dict[str, Path]:
    return {
        "no #! and not ELF": write_script(tmp_path / "plain.sh", "echo hello\n"),
        "missing interpreter": write_script(tmp_path / "missing.sh", "#!/no/such/interpreter\necho hello\n"),
        "env of a missing program": write_script(tmp_path / "env.sh", "#!/usr/bin/env nothere-spot-test\necho hello\n"),
        "interpreter not executable": write_script(tmp_path / "data.sh", f"#!{tmp_path / 'plain.txt'}\n"),
    }


@pytest.mark.parametrize("kind", ["no #! and not ELF", "missing interpreter", "env of a missing program",
                                  "interpreter not executable"])
def test_a_command_the_kernel_cannot_exec_exits_78_with_one_line(azurite: Azurite, queue_name: str, tmp_path: Path,
                                                                 kind: str) -> None:
    (tmp_path / "plain.txt").write_text("not a program\n")
    command = str(broken_commands(tmp_path)[kind])
    env = program_env(azurite, queue_name, command)
    for argv in ([*SUPERVISOR, "run"], [sys.executable, "-m", "worker"]):
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 78, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "workload.command: " in lines[0] and command in lines[0], proc.stderr


def test_why_not_runnable_accepts_what_the_kernel_runs(tmp_path: Path) -> None:
    assert why_not_runnable("/bin/true") is None
    assert why_not_runnable(str(write_script(tmp_path / "a.sh", "#!/bin/sh\n"))) is None
    assert why_not_runnable(str(write_script(tmp_path / "b.sh", "#! /bin/sh -e\n"))) is None
    assert why_not_runnable(str(write_script(tmp_path / "c.sh", "#!/usr/bin/env sh\n"))) is None
    assert why_not_runnable(str(write_script(tmp_path / "d.sh", "#!/usr/bin/env -S sh -e\n"))) is None
    assert why_not_runnable(str(write_script(tmp_path / "e.sh", f"#!{tmp_path / 'a.sh'}\n"))) is None  # nested
    assert "not found on PATH" in str(why_not_runnable(str(write_script(tmp_path / "f.sh", "#!/usr/bin/env -S nothere-x -e\n"))))


def test_a_program_that_cannot_be_executed_at_run_time_is_released_never_failed(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    good = "#!/bin/sh\ncat > /dev/null\ntouch \"$PROG_OUT/$SPOT_MESSAGE_ID\"\n"
    program = write_script(tmp_path / "program.sh", good)
    env = program_env(azurite, queue_name, str(program), queue_max_dequeue_count="1", queue_retry_delay_s="0.5")
    env["PROG_OUT"] = str(out)
    sup = supervisors(env)
    sup.wait_for_workers(1)
    sup.wait_for_log("ready: ")
    write_script(tmp_path / "broken.sh", "#!/no/such/interpreter\n").replace(program)  # after the start check
    message_id = queue.send_message("x").id
    sup.wait_for_log(f"message {message_id}: cannot start {program}", 20)
    write_script(tmp_path / "fixed.sh", good).replace(program)
    wait_until(lambda: (out / message_id).exists(), 40, lambda: f"the message to run once fixed; log:\n{sup.log()[-3000:]}")
    wait_until(lambda: message_count(queue) == 0, 10, lambda: f"the message to be done; log:\n{sup.log()[-3000:]}")
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    assert message_count(poison) == 0, "a message whose program never ran moved toward poison"
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0


# --- the run's directory ---------------------------------------------------------------------------------


def test_a_program_removing_its_run_directory_breaks_no_later_run_nor_the_drain(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path, supervisors: Callable[..., Supervisor]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = program_env(azurite, queue_name, str(PROGRAMS / "hostile_rundir.sh"), queue_max_dequeue_count="1",
                      queue_retry_delay_s="0.5", shutdown_drain_timeout_s="10")
    env["PROG_OUT"] = str(out)
    sup = supervisors(env)
    queue.send_message("rm")
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the first message to be done; log:\n{sup.log()[-3000:]}")
    carry = queue.send_message("carry").id
    wait_until(lambda: message_count(queue) == 0, 30, lambda: f"the checkpoint carrier to be done; log:\n{sup.log()[-3000:]}")
    assert (out / carry).read_text() == '{"carried": true}'
    waiting = queue.send_message("wait").id
    pid_file = out / f"{waiting}.pid"
    pid = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), 15,
                         lambda: f"the program to start; log:\n{sup.log()[-3000:]}"))
    sup.send(signal.SIGTERM)
    assert sup.wait(15) == 0
    assert (out / f"{waiting}.term").read_text() == "stopped\n", "the running program never got its stop signal"
    assert gone(pid)
    assert visible_ids(queue) == {waiting}, "the drained message was not released"
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    assert message_count(poison) == 0


# --- output ---------------------------------------------------------------------------------------------


def test_control_characters_in_program_output_reach_the_log_escaped(
        azurite: Azurite, queue: QueueClient, queue_name: str, supervisors: Callable[..., Supervisor]) -> None:
    message_id = queue.send_message("x").id
    sup = supervisors(program_env(azurite, queue_name, str(PROGRAMS / "hostile_output.sh")))
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the message to be done; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGTERM)
    assert sup.wait(10) == 0
    log = sup.log()
    assert f"message {message_id} stdout: colour \\x1b[31mred\\x1b[0m\\x0dover\\x07 tab\there\n" in log
    assert f"message {message_id} stderr: clear \\x1b[2J\\x1b]0;title\\x07 end\n" in log
    assert "\x1b" not in log and "\x07" not in log and "\r" not in log


# --- whatever goes wrong while a run is supervised ------------------------------------------------------


def test_an_error_while_supervising_a_run_kills_the_program_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's side failing (here: out of memory while reading the program's output) ends the attempt;
    the program must not survive it, or a retry could run beside it."""
    pid_file = tmp_path / "pid"
    program = write_script(tmp_path / "p.sh", f"#!/bin/sh\necho $$ > {pid_file}\necho started\nexec sleep 30\n")
    handler = ProgramHandler([str(program)], signal.SIGTERM, 0)

    def out_of_memory(fd: int, lines: object) -> bool:
        if pid_file.exists() and pid_file.read_text().strip():
            raise MemoryError()
        return True

    monkeypatch.setattr("worker.programs.runner._read_available", out_of_memory)
    ctx = SimpleNamespace(draining=False, deadline=None, state=None, message_id="m1")
    with pytest.raises(MemoryError):
        handler(Message("m1", "", 1, None), ctx)  # type: ignore[arg-type]
    pid = int(pid_file.read_text())
    assert gone(pid), "the program outlived its attempt"
    assert handler.runs == set()
