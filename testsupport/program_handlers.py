"""Python handlers for tests/programs/test_program.py (`testsupport.program_handlers:<name>`)."""

from __future__ import annotations

import os
import subprocess
import time

from worker.context import Context
from worker.message import Message


def start_a_child(message: Message, ctx: Context) -> None:
    """Starts `sleep 1000` (its pid to $PROG_PIDS), then works for a minute."""
    child = subprocess.Popen(["sleep", "1000"])
    with open(os.environ["PROG_PIDS"] + ".tmp", "w") as fh:
        fh.write(f"{child.pid}\n")
    os.replace(os.environ["PROG_PIDS"] + ".tmp", os.environ["PROG_PIDS"])
    time.sleep(60)
