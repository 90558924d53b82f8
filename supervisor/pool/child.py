"""What runs in a forked worker process, before and around the worker's own loop."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import FrameType

from supervisor.vm.gpus import Gpu, pin_to_gpu
from worker.control import Channel
from worker.process import WorkerProcess
from worker.queue.lease_slots import LeaseSlots
from worker.settings import Settings
from worker.telemetry.logs import setup_logging
from worker.telemetry.providers import setup_telemetry

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGQUIT when the supervisor dies, however it died.

    SIGQUIT, not SIGKILL: the worker releases what it holds at once instead of
    leaving it invisible until the lease runs out. The control channel's EOF
    is the second line of defence.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGQUIT, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: rely on the channel EOF and the ppid check
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _exit_at_once(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)


@dataclass(frozen=True)
class ChildSetup:
    """What a forked worker process starts from."""

    settings: Settings
    slot: int
    threads: int
    sock: socket.socket  # the worker's end of its control channel
    supervisor_pid: int  # taken before fork: by the time the child asks, the supervisor may be gone
    inherited_fds: Sequence[int]  # the supervisor's descriptors, closed in the child
    attributes: dict[str, str]
    gpu: Gpu | None = None
    lease_slots: LeaseSlots | None = None


def run_child(setup: ChildSetup) -> None:
    """Never returns: exits the process with the worker's exit code.

    The handler is imported here, after the fork and after CUDA_VISIBLE_DEVICES is set: CUDA
    initialised at import time is initialised in this process, for its GPU only."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        # Until WorkerProcess installs its own handlers, the supervisor's would only record into a copy
        # of its list, losing e.g. the parent-death SIGQUIT. Holding nothing yet, the child just exits.
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            signal.signal(sig, _exit_at_once)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
        die_with_parent(setup.supervisor_pid)
        for fd in setup.inherited_fds:  # the supervisor's ends of every channel: keep them and EOF never comes
            try:
                os.close(fd)
            except OSError:
                pass
        gpu_attributes = pin_to_gpu(setup.gpu) if setup.gpu is not None else {}
        setup_logging(setup.settings.telemetry.log_level, f"worker-{setup.slot}")
        telemetry = setup_telemetry(setup.settings.telemetry, "worker",
                                    {**setup.attributes, "spot.worker.index": str(setup.slot), **gpu_attributes},
                                    point_attributes=gpu_attributes)
        try:
            code = WorkerProcess(setup.settings, telemetry, setup.threads, Channel(setup.sock), setup.supervisor_pid,
                                 setup.lease_slots).run()
        finally:
            telemetry.shutdown()
    except BaseException:  # anything unexpected in a child is logged, then the supervisor decides
        logging.getLogger(__name__).exception("worker %d failed", setup.slot)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
