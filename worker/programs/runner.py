"""Programs as handlers: `[workload] command` runs once per message.

The body goes to standard input; SPOT_MESSAGE_ID, SPOT_DEQUEUE_COUNT,
SPOT_INSERTED_ON, SPOT_CHECKPOINT_FILE and SPOT_DEADLINE_FILE go to the
environment. Exit 0 = done, 75 = released, anything else = failed. A drain sends
`stop_signal` to the program; at the deadline the program and everything it
started are killed and the message is released with its last checkpoint.

Each run is its own session (so its process group can be killed without
touching the worker); its files live in a private directory of its own,
removed when the run ends.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from worker.common.process_tree import kill_group, kill_process_tree
from worker.common.secrets import program_environment
from worker.context import Context
from worker.message import Interrupted, Message
from worker.programs.command import resolve_command
from worker.programs.files import CheckpointFile, OutputLines, write_deadline_file
from worker.settings import ConfigError, WorkloadSettings
from worker.workload_errors import CommandError

log = logging.getLogger("worker.programs.runner")

EX_TEMPFAIL = 75
CHECKPOINT_EVERY_S = 1.0
TICK_S = 0.05  # how soon a drain, a deadline or a timeout is acted on
READ_CHUNK = 65536


class ProgramFailed(Exception):
    """The program's run failed (exit status, a signal the worker did not send, or workload.timeout_s)."""


class ProgramRun:
    """One program run for one message. Its lock serialises checkpoint stores and kills
    between the handler thread and a deadline (WorkerRuntime.abandon on the main thread)."""

    def __init__(self, proc: subprocess.Popen[bytes], ctx: Context, checkpoint: CheckpointFile, deadline_file: Path) -> None:
        self.proc = proc
        self.ctx = ctx
        self.checkpoint = checkpoint
        self.deadline_file = deadline_file
        self.lock = threading.Lock()
        self.stopped_by: str | None = None  # "drain" (stop signal sent), "deadline" (on_abandon), "timeout" or "error" (killed)
        self.killed = False
        self.exited = False

    def signal(self, signum: int) -> None:
        with self.lock:
            if not self.exited:
                _send(self.proc.pid, signum)

    def kill(self, reason: str) -> None:
        """The program, its process group and its descendants. A program that already exited
        keeps its own outcome; the first reason given is kept."""
        with self.lock:
            if self.exited or self.killed:
                return
            self.killed = True
            if _has_exited(self.proc.pid):  # done on its own, not yet seen by its thread: its exit status counts
                kill_group(self.proc.pid)
                return
            self.stopped_by = reason
            kill_process_tree(self.proc.pid, self.proc.pid)

    def sync_checkpoint(self) -> None:
        with self.lock:
            self.checkpoint.sync()

    def mark_exited(self) -> None:
        """The program is a zombie (not reaped yet, so its pid and group id cannot be reused):
        kill whatever of its group is left, so nothing of this run outlives it."""
        with self.lock:
            self.exited = True
            kill_group(self.proc.pid)  # its children left in the group (any that left it are the supervisor's to sweep)


class ProgramHandler:
    """The handler for `[workload] command`; one per worker process, called from every consumer thread."""

    def __init__(self, argv: list[str], stop_signal: int, timeout_s: float) -> None:
        self.argv = argv
        self.stop_signal = stop_signal
        self.timeout_s = timeout_s
        self.runs: set[ProgramRun] = set()
        self._runs_lock = threading.Lock()
        self.stopped = False  # on_abandon ran: this process is about to exit
        self._run_numbers = itertools.count(1)

    @classmethod
    def from_settings(cls, workload: WorkloadSettings) -> ProgramHandler:
        """Raises CommandError (exit 78) when the command cannot be run."""
        try:
            argv = resolve_command(workload.command)
        except ConfigError as exc:
            raise CommandError(str(exc)) from None
        return cls(argv, signal.Signals[workload.stop_signal], workload.timeout_s)

    def __call__(self, message: Message, ctx: Context) -> None:
        if ctx.draining:  # a drain began after this message was taken: give it back untouched
            raise Interrupted()
        try:  # each run's files in a private directory (0700) of its own: what one program does to it is its own business
            run_dir = Path(tempfile.mkdtemp(prefix=f"spot-{os.getpid()}-{next(self._run_numbers)}-"))
        except OSError as exc:
            log.error("message %s: cannot create the run's directory (%s); releasing the message", message.id, exc.strerror)
            raise Interrupted() from None
        try:
            self._run(message, ctx, run_dir)
        finally:
            if run_dir.is_symlink():  # the program swapped its directory for a link: remove the link, not its target
                run_dir.unlink(missing_ok=True)
            else:
                shutil.rmtree(run_dir, ignore_errors=True)

    def _run(self, message: Message, ctx: Context, run_dir: Path) -> None:
        try:
            checkpoint = CheckpointFile(run_dir / "checkpoint.json", ctx)
        except OSError as exc:  # the handler never ran: not a failure
            log.error("message %s: cannot write the checkpoint file (%s); releasing the message", message.id, exc.strerror)
            raise Interrupted() from None
        deadline_file = run_dir / "deadline"
        # The worker's environment as it is now (GPU pinning included), without the package's secrets and settings.
        env = {**program_environment(os.environ),
               "SPOT_MESSAGE_ID": message.id,
               "SPOT_DEQUEUE_COUNT": str(message.dequeue_count),
               "SPOT_INSERTED_ON": message.inserted_on.isoformat() if message.inserted_on else "",
               "SPOT_CHECKPOINT_FILE": str(checkpoint.path),
               "SPOT_DEADLINE_FILE": str(deadline_file)}
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    env=env, start_new_session=True)
        except OSError as exc:  # e.g. the file or its interpreter vanished since start: the program never ran
            log.error("message %s: cannot start %s (%s); releasing the message", message.id, self.argv[0], exc.strerror)
            raise Interrupted() from None
        run = ProgramRun(proc, ctx, checkpoint, deadline_file)
        with self._runs_lock:
            self.runs.add(run)
            if self.stopped:  # started while on_abandon ran: it must not outlive the worker either
                run.kill("deadline")
        try:
            returncode = self._supervise(run, message)
        except BaseException:  # the program must not outlive its attempt (a retry could run beside it)
            run.kill("error")
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            raise
        finally:
            with self._runs_lock:
                self.runs.discard(run)
        self._judge(run, returncode, message)

    def close(self) -> None:
        """When the worker exits: nothing left to do (each run removes its own directory)."""

    def on_abandon(self) -> None:
        """At the drain deadline, before the worker releases what it holds: kill every running
        program and store its last checkpoint, so the release carries it."""
        with self._runs_lock:
            self.stopped = True
            runs = list(self.runs)
        for run in runs:
            run.kill("deadline")
            run.sync_checkpoint()
        if runs:
            log.warning("deadline: killed %d running program(s)", len(runs))

    def _supervise(self, run: ProgramRun, message: Message) -> int:
        """Feed stdin, log output, store checkpoints, act on a drain and the timeout; returns the exit status.
        The drain deadline is the worker's to act on (on_abandon), before it releases what it holds."""
        proc = run.proc
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        started = time.monotonic()
        body = memoryview(message.body.encode("utf-8"))
        outputs = {proc.stdout.fileno(): OutputLines(message.id, "stdout"),
                   proc.stderr.fileno(): OutputLines(message.id, "stderr")}
        selector = selectors.DefaultSelector()
        for fd in outputs:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        stdin_fd = proc.stdin.fileno()
        if body:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        exit_fd = _pidfd(proc.pid)
        if exit_fd is not None:
            selector.register(exit_fd, selectors.EVENT_READ)
        deadline_written: float | None = None
        next_checkpoint = started + CHECKPOINT_EVERY_S
        try:
            while True:
                for key, _ in selector.select(TICK_S):
                    fd = int(key.fd)
                    if fd == stdin_fd:
                        body = self._write_stdin(proc, selector, body)
                    elif fd in outputs:
                        if not _read_available(fd, outputs[fd]):
                            selector.unregister(fd)
                if _has_exited(proc.pid):
                    break
                now = time.monotonic()
                drain_deadline = _epoch(run.ctx)
                if drain_deadline is not None and drain_deadline != deadline_written:
                    write_deadline_file(run.deadline_file, drain_deadline, message.id)
                    if deadline_written is None:
                        run.stopped_by = run.stopped_by or "drain"
                        log.info("message %s: drain, sending %s to the program", message.id, signal.Signals(self.stop_signal).name)
                        run.signal(self.stop_signal)
                    deadline_written = drain_deadline
                if self.timeout_s and now - started >= self.timeout_s:
                    run.kill("timeout")
                if now >= next_checkpoint:
                    run.sync_checkpoint()
                    next_checkpoint = now + CHECKPOINT_EVERY_S
            run.mark_exited()
            for fd, lines in outputs.items():  # what is left in the pipes (nothing more can come)
                _read_available(fd, lines)
                lines.close()
            return proc.wait()
        finally:
            selector.close()
            if exit_fd is not None:
                os.close(exit_fd)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    stream.close()
                except OSError:
                    pass

    @staticmethod
    def _write_stdin(proc: subprocess.Popen[bytes], selector: selectors.BaseSelector, body: memoryview) -> memoryview:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        try:
            written = os.write(fd, body)
            body = body[written:]
        except BlockingIOError:
            return body
        except OSError as exc:  # the program closed its stdin without reading it all: its business
            if exc.errno != errno.EPIPE:
                raise
            body = body[:0]
        if not body:
            selector.unregister(fd)
            proc.stdin.close()
        return body

    def _judge(self, run: ProgramRun, returncode: int, message: Message) -> None:
        """Exit status → outcome: return (delete), Interrupted (release) or ProgramFailed (retry, poison)."""
        stopped_by = run.stopped_by
        if returncode == 0 and stopped_by not in ("deadline", "timeout"):
            return
        run.sync_checkpoint()  # once more at exit: the release or the retry carries the newest one
        if stopped_by == "timeout":
            raise ProgramFailed(f"ran longer than workload.timeout_s ({self.timeout_s:g}s): killed")
        if returncode == EX_TEMPFAIL or stopped_by in ("drain", "deadline"):
            log.info("message %s: program %s; releasing the message", message.id,
                     "killed at the drain deadline" if stopped_by == "deadline" else f"ended ({_describe(returncode)})")
            raise Interrupted()
        raise ProgramFailed(_describe(returncode))


def _epoch(ctx: Context) -> float | None:
    deadline = ctx.deadline
    return None if deadline is None else deadline.timestamp()


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"killed by signal {signal.Signals(-returncode).name}"
    return f"exit code {returncode}"


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _pidfd(pid: int) -> int | None:
    """A descriptor that becomes readable when the program exits (Linux 5.3+); None: poll each tick."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _has_exited(pid: int) -> bool:
    """Exited, but not reaped: until proc.wait() its pid and process group id stay ours."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _read_available(fd: int, lines: OutputLines) -> bool:
    """Read what the pipe holds now (bounded per call); False at end of stream."""
    for _ in range(64):  # at most 4 MiB per turn: the loop must also look at the clock
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if not chunk:
            return False
        lines.feed(chunk)
    return True
