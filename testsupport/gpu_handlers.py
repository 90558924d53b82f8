"""Handlers for tests/e2e/test_gpu_supervisor.py (`testsupport.gpu_handlers:record`).

Importing this module appends {"pid", "ppid", "cuda"} (CUDA_VISIBLE_DEVICES as the
import saw it, None when unset) to the file GPU_IMPORTS: what a handler that
initialises CUDA at import time would see. `record` appends the same for each
message, with its id, to GPU_EVENTS.
"""

from __future__ import annotations

import json
import os
import time

from worker.context import Context
from worker.message import Message


def _append(path_var: str, **fields: object) -> None:
    path = os.environ.get(path_var)
    if not path:
        return
    line = json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), **fields})
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


_append("GPU_IMPORTS")


def record(message: Message, ctx: Context) -> None:
    _append("GPU_EVENTS", id=message.id)
    time.sleep(0.05)
