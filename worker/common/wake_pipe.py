"""A self-pipe that ends a select() early: signal handlers (through signal.set_wakeup_fd) and other threads
write to it, the main loop selects on its read end and empties it."""

from __future__ import annotations

import os


class WakePipe:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)  # emptied without knowing how much is in it
        os.set_blocking(self.write_fd, False)  # a full pipe already wakes the loop: never block a signal handler

    @property
    def fds(self) -> list[int]:
        return [self.read_fd, self.write_fd]

    def wake(self) -> None:
        try:
            os.write(self.write_fd, b"!")
        except BlockingIOError:
            pass

    def empty(self) -> None:
        try:
            while os.read(self.read_fd, 4096):
                pass
        except BlockingIOError:
            pass
