"""The one recording handler of the tests: `testsupport.handlers:record`.

Steered by the message body, when the body is a JSON object (any other body:
record the attempt and succeed):

    checkpoint      value to checkpoint at the start of an attempt that has no state yet
    big_checkpoint  n: then try to checkpoint a string of n characters, recording CheckpointTooLarge
    steps, step_s   resume from ctx.state {"step": k}: sleep step_s, checkpoint {"step": k+1}, ... up to steps
    sleep           seconds to run (in small slices)
    wait_file       run until this path exists (at most `timeout` s, default 30)
    ignore_drain    keep running during a drain (default: stop sleeping/waiting and raise Interrupted)
    after_wait_checkpoint  value to checkpoint after sleeping/waiting (its result is recorded)
    interrupt_until raise Interrupted while dequeue_count <= this
    fail_until      raise RuntimeError while dequeue_count <= this
    fail            always raise RuntimeError
    exit            raise SystemExit with this code
    hold_gil_s      after `checkpoint`, hold the GIL this long in one C call (libc usleep through ctypes.PyDLL),
                    as a catastrophic regex or a C extension would; only while dequeue_count <= hold_gil_until
                    (default: every attempt)
    burn_gil_s      after `checkpoint`, compute this long in one C call that never releases the GIL

Every event of every attempt ("start" with `draining` and `state`, "checkpoint",
"end" with `outcome` succeeded | interrupted | failed) is one JSON line,
appended with a single O_APPEND write to the file named by $TEST_HANDLER_RECORD
(read once per attempt), so lines from many threads and processes never
interleave.

Importing this module sleeps $TEST_HANDLER_IMPORT_DELAY_S seconds (a slow
handler import, as a worker sees it before it reports ready), then appends the
importing pid to the file $TEST_HANDLER_IMPORTED, if set.
"""

from __future__ import annotations

import ctypes
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker import CheckpointTooLarge, Context, Interrupted, Message

RECORD_ENV = "TEST_HANDLER_RECORD"
IMPORT_DELAY_ENV = "TEST_HANDLER_IMPORT_DELAY_S"
IMPORTED_ENV = "TEST_HANDLER_IMPORTED"
SLICE_S = 0.02

time.sleep(float(os.environ.get(IMPORT_DELAY_ENV) or 0))
if os.environ.get(IMPORTED_ENV):
    with open(os.environ[IMPORTED_ENV], "a") as _imported:
        _imported.write(f"{os.getpid()}\n")


def record(message: Message, ctx: Context) -> None:
    path = os.environ.get(RECORD_ENV)
    spec = _spec(message.body)

    def emit(event: str, **fields: Any) -> None:
        if path:
            append_line(path, {"event": event, "id": message.id, "dequeue_count": message.dequeue_count,
                               "pid": os.getpid(), "thread": threading.get_ident(), "t": time.time(), **fields})

    emit("start", body=message.body, state=ctx.state, draining=ctx.draining,  # True: started although a drain had begun
         inserted_on=message.inserted_on.isoformat() if message.inserted_on else None,
         receipt=getattr(getattr(ctx, "_lease", None), "pop_receipt", None))  # lets a test play "another consumer"
    try:
        _run(spec, message, ctx, emit)
    except Interrupted:
        emit("end", outcome="interrupted")
        raise
    except BaseException as exc:
        emit("end", outcome="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    emit("end", outcome="succeeded")


def _run(spec: dict[str, Any], message: Message, ctx: Context, emit: Callable[..., None]) -> None:
    ignore_drain = bool(spec.get("ignore_drain"))
    if "checkpoint" in spec and ctx.state is None:
        emit("checkpoint", state=spec["checkpoint"], stored=ctx.checkpoint(spec["checkpoint"]))
    if "hold_gil_s" in spec and message.dequeue_count <= int(spec.get("hold_gil_until", 1 << 30)):
        ctypes.PyDLL(None).usleep(int(float(spec["hold_gil_s"]) * 1_000_000))  # PyDLL: the GIL stays held
        emit("held_gil", seconds=float(spec["hold_gil_s"]))
    if "burn_gil_s" in spec:
        _burn_holding_the_gil(float(spec["burn_gil_s"]))
        emit("burned_gil", seconds=float(spec["burn_gil_s"]))
    if "big_checkpoint" in spec:
        try:
            ctx.checkpoint({"big": "x" * int(spec["big_checkpoint"])})
        except CheckpointTooLarge as exc:
            emit("too_large", error=str(exc))
        else:
            emit("big_stored")
    if "steps" in spec:
        step = (ctx.state or {}).get("step", 0)
        while step < int(spec["steps"]):
            _pause(float(spec.get("step_s", 0.1)), ctx, ignore_drain)
            step += 1
            stored = ctx.checkpoint({"step": step})
            emit("checkpoint", state={"step": step}, stored=stored)
    if "sleep" in spec:
        _pause(float(spec["sleep"]), ctx, ignore_drain)
    if "wait_file" in spec:
        deadline = time.monotonic() + float(spec.get("timeout", 30))
        while not os.path.exists(spec["wait_file"]) and time.monotonic() < deadline:
            _pause(SLICE_S, ctx, ignore_drain)
    if "after_wait_checkpoint" in spec:
        emit("checkpoint", state=spec["after_wait_checkpoint"], stored=ctx.checkpoint(spec["after_wait_checkpoint"]))
    if message.dequeue_count <= int(spec.get("interrupt_until", 0)):
        raise Interrupted()
    if spec.get("exit"):
        raise SystemExit(int(spec["exit"]))
    if spec.get("fail") or message.dequeue_count <= int(spec.get("fail_until", 0)):
        raise RuntimeError(f"failing on purpose (attempt {message.dequeue_count})")


def _pause(seconds: float, ctx: Context, ignore_drain: bool) -> None:
    until = time.monotonic() + seconds
    while True:
        if ctx.draining and not ignore_drain:
            raise Interrupted()
        left = until - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(SLICE_S, left))


def _spec(body: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # any other body: record the attempt and succeed
        return {}
    return data if isinstance(data, dict) else {}


# -- reading and writing the record ----------------------------------------------------------------


def append_line(path: str | os.PathLike[str], data: dict[str, Any]) -> None:
    line = (json.dumps(data, ensure_ascii=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def read_json_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines file that processes are still appending to.

    One O_APPEND write is never interleaved with another, but a reader can see
    the first part of a line that straddles a page boundary before the rest:
    a last line without its newline is not written yet.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")  # a partial last character: dropped below
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.split("\n")[:-1] if line.strip()]


def read_records(path: str | os.PathLike[str], event: str | None = None) -> list[dict[str, Any]]:
    return [r for r in read_json_lines(path) if event is None or r["event"] == event]


def succeeded_ids(path: str | os.PathLike[str]) -> set[str]:
    """Ids of the messages whose handler returned (recorded just before the return, i.e. before the delete)."""
    return {r["id"] for r in read_records(path, "end") if r["outcome"] == "succeeded"}


def _burn_holding_the_gil(seconds: float) -> None:
    """Compute for about `seconds` in one C call (sum over a range never returns to the eval loop)."""
    sample = 2_000_000
    started = time.perf_counter()
    sum(range(sample))
    per_item = max(1e-10, (time.perf_counter() - started) / sample)
    sum(range(int(seconds / per_item)))
