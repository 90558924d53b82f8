"""No strays: the supervisor is a child subreaper and kills whatever its workers leave behind.

When a worker dies (SIGKILL included), the kernel hands the processes it
started (a program run, a Python handler's subprocess) and their orphaned
descendants to the nearest subreaper: this process, instead of PID 1. Every
child of ours that is not a worker is such a stray; left alive it would keep
working on a message that another worker will receive again. The main loop
calls sweep() on every turn; reap_workers() reaps what it killed.

The rule holds because the supervisor itself starts no process but its workers
(or only synchronously, on the main loop's thread, between two sweeps).
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from collections.abc import Collection

import psutil

from worker.common.process_tree import kill_process_tree, process_group

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Linux only; False (and one warning) where prctl is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        reason = os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as exc:
        reason = str(exc)
    log.warning("cannot become a child subreaper (%s): processes a dead worker started may outlive it", reason)
    return False


def own_children() -> set[int]:
    """This process's children, from /proc/self/task/*/children (cheap: no scan of every process)."""
    children: set[int] = set()
    files = glob.glob("/proc/self/task/*/children")
    if not files:  # kernel without CONFIG_PROC_CHILDREN
        return {p.pid for p in psutil.Process().children()}
    for path in files:
        try:
            with open(path) as fh:
                children.update(int(pid) for pid in fh.read().split())
        except OSError:  # that thread just ended
            continue
    return children


def sweep(workers: Collection[int]) -> list[int]:
    """Kill every child that is not a worker, with its process group and descendants; returns the pids killed."""
    strays = own_children() - set(workers)
    killed: list[int] = []
    for pid in sorted(strays):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; reap_workers reaps it
        except psutil.Error:
            continue
        killed += kill_process_tree(pid, process_group(pid))
    if killed:
        log.warning("killed %d process(es) left behind by a worker (pids %s)", len(killed), ", ".join(map(str, killed)))
    return killed
