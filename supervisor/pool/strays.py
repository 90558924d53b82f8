"""No strays: the supervisor is a child subreaper and kills whatever its workers leave behind.

When a worker dies (SIGKILL included), the kernel hands the processes it
started (a program run, a Python handler's subprocess) and their orphaned
descendants to the nearest subreaper: this process, instead of PID 1. Every
child of ours that is not a worker is such a stray; left alive it would keep
working on a message that another worker will receive again. The main loop
calls sweep() on every turn; reap_workers() reaps what it killed.

A live run orphans processes too: a program that backgrounds a helper from a
subshell (`( helper & )`) hands the helper to us while the program still runs,
in the program's own process group. Killing that group would kill the program.
Such a stray belongs to its run: it is left alone while the group's leader (the
program) lives under a live worker, and dies with the group when the run ends
(the worker kills the program's group then) or on a later sweep once the
leader is gone.

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
    """Kill every child that is not a worker, with its process group and descendants, except what a live run
    still owns (above); returns the pids killed."""
    strays = own_children() - set(workers)
    killed: list[int] = []
    for pid in sorted(strays):
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                continue  # already dead; reap_workers reaps it
        except psutil.Error:
            continue
        group = process_group(pid)
        if group is not None and owned_by_live_run(group, workers):
            continue
        killed += kill_process_tree(pid, group)
    if killed:
        log.warning("killed %d process(es) left behind by a worker (pids %s)", len(killed), ", ".join(map(str, killed)))
    return killed


def owned_by_live_run(group: int, workers: Collection[int]) -> bool:
    """The group's leader (a program a worker started in its own session) is alive under a live worker."""
    try:
        leader = psutil.Process(group)
        if leader.status() == psutil.STATUS_ZOMBIE:  # the run ended: its worker is killing the group anyway
            return False
        return any(parent.pid in workers for parent in leader.parents())
    except psutil.Error:  # no leader any more: nobody owns the group
        return False
