"""The workload of the systemd end-to-end test (scripts/systemd_e2e.py), run inside the unit's sandbox.

Bodies: "hold:S" works S seconds and ignores a drain (the drain deadline has to
cut it short); "probe" logs which places this sandbox can write; anything else
is done at once.
"""

from __future__ import annotations

import os
import time
from typing import Any

PROBED = ("/", "/etc", "/opt", "/usr", "/var", "/var/lib/spot-supervisor", "/var/log", "/var/tmp", "/tmp",
          "/dev/shm", "/dev/mqueue", "/run", "/run/lock", "/run/systemd", "/home", "/root", "/srv", "/proc/sys")


def writable(directory: str) -> bool:
    path = os.path.join(directory, f".spot-probe-{os.getpid()}")
    try:
        with open(path, "w"):
            pass
    except OSError:
        return False
    os.unlink(path)
    return True


def handle(message: Any, ctx: Any) -> None:
    if message.body.startswith("hold:"):
        ctx.logger.info("holding %s, deaf to a drain", message.body)
        time.sleep(float(message.body[5:]))
    elif message.body == "probe":
        ctx.logger.info("probe: writable: %s", " ".join(d for d in PROBED if writable(d)) or "nothing")
    else:
        ctx.logger.info("handled %s", message.body)
