"""Killing a process and everything it started, without ever hitting the caller's own group.

Used by a worker for the programs it runs (at a deadline, a timeout, or when a
run ends with processes left over) and by the supervisor for strays its workers
left behind.
"""

from __future__ import annotations

import errno
import os
import signal

import psutil


def kill_process_tree(root: int, group: int | None = None) -> list[int]:
    """SIGKILL `root`, its process group `group` (unless it is our own) and every descendant of it.

    Descendants are collected before anything is killed, while they are still
    linked to `root`: those that left its group (setsid) are found that way.
    Returns the pids signalled. Never raises for processes already gone.
    """
    own_group = os.getpgrp()
    try:
        descendants = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        descendants = []
    killed: list[int] = []
    if group is not None and group != own_group:
        kill_group(group)
    if _kill(root):
        killed.append(root)
    for process in descendants:
        try:
            process.kill()  # psutil checks the pid still names the same process
            killed.append(process.pid)
        except psutil.Error:
            pass
    return killed


def kill_group(group: int) -> None:
    """SIGKILL a process group other than our own; a group already gone is fine."""
    if group <= 1 or group == os.getpgrp():
        return
    try:
        os.killpg(group, signal.SIGKILL)
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise


def _kill(pid: int) -> bool:
    if pid <= 1 or pid == os.getpid():
        return False
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except OSError as exc:
        if exc.errno not in (errno.ESRCH, errno.EPERM):
            raise
        return False


def process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
