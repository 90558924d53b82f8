"""The three benchmark workloads, and the handler each tool calls for them.

The same function does the work whoever calls it: spot-supervisor (handler
"workloads:<name>", called with (message, ctx)), the bare SDK loop and the
Celery task (both call `run(name, body)`). Each records its completion in the
log named by BENCH_DONE.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import record_completion
from worker.sample import burn


def _noop(body: str) -> None:
    return None


def _cpu20(body: str) -> None:
    burn(body.encode(), 0.020)


def _io200(body: str) -> None:
    """200 ms waiting on I/O (a sleep: the process is idle, as on a slow HTTP call)."""
    time.sleep(0.200)


WORKLOADS = {"noop": _noop, "cpu20": _cpu20, "io200": _io200}


def run(name: str, body: str) -> None:
    started = time.time()
    WORKLOADS[name](body)
    record_completion(body, started)


# spot-supervisor handlers: handle(message, ctx)
def noop(message: Any, ctx: Any) -> None:
    run("noop", message.body)


def cpu20(message: Any, ctx: Any) -> None:
    run("cpu20", message.body)


def io200(message: Any, ctx: Any) -> None:
    run("io200", message.body)
