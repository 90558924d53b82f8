"""Handlers for the eviction tests (imported by worker processes via PYTHONPATH=tests)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from worker import Context, Message


def stubborn(message: Message, ctx: Context) -> None:
    """Sleeps body["seconds"], ignoring ctx.draining; records the completion like the sample handler."""
    results = Path(os.environ["SPOT_SAMPLE_RESULTS"])
    (results.parent / "stubborn.started").touch()
    time.sleep(float(json.loads(message.body)["seconds"]))
    with results.open("a") as fh:
        fh.write(json.dumps({"id": message.id, "pid": os.getpid(), "resumed_from": 0}) + "\n")
