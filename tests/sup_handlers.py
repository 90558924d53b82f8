"""Handlers for tests/test_supervisor.py.

If SUP_EVENTS names a file, every handler call appends JSON lines to it:
{"event": "start" | "done" | "interrupted", "id", "pid", "dequeue_count", "t"} (a start also
has "draining": ctx.draining at that moment)
("done" is written just before returning, i.e. before the message is deleted).

Body: JSON such as {"s": 1.5, "cooperative": true}: sleep `s` seconds in small
steps; a cooperative handler raises Interrupted as soon as ctx.draining.

Importing this module sleeps SUP_IMPORT_DELAY_S seconds (a slow handler import,
as a worker sees it before it reports ready), then appends the importing pid to
the file SUP_IMPORTED, if set.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

from worker.context import Context
from worker.message import Interrupted, Message

time.sleep(float(os.environ.get("SUP_IMPORT_DELAY_S") or 0))
if os.environ.get("SUP_IMPORTED"):
    with open(os.environ["SUP_IMPORTED"], "a") as _imported:
        _imported.write(f"{os.getpid()}\n")


def _emit(event: str, message: Message, **extra: Any) -> None:
    path = os.environ.get("SUP_EVENTS")
    if not path:
        return
    line = json.dumps({"event": event, "id": message.id, "pid": os.getpid(), "thread": threading.get_ident(),
                       "dequeue_count": message.dequeue_count, "t": time.time(), **extra})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one O_APPEND write: lines from many processes never interleave
    finally:
        os.close(fd)


def sleepy(message: Message, ctx: Context) -> None:
    params = json.loads(message.body)
    seconds = float(params.get("s", 0.5))
    cooperative = bool(params.get("cooperative", False))
    _emit("start", message, draining=ctx.draining)  # True: started although a drain had begun
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        if cooperative and ctx.draining:
            _emit("interrupted", message)
            raise Interrupted()
        time.sleep(0.02)
    _emit("done", message)
