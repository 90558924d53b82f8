"""The packaged unit under a real systemd (scripts/systemd-e2e.sh, issue 15).

Boots a Debian container with systemd as PID 1, installs the package with
orchestrate.sh and checks notify, sandbox, stop, crash, eviction, upgrade,
uninstall and boot from systemctl/journalctl inside it: about 3 to 6 minutes,
the root file system cached under ~/.cache/spot-supervisor. A machine that
cannot run it (not root, no Debian mirror, no cgroup hierarchy) skips it with
the script's one-line reason; a failing check fails the test with its journal.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXIT_SKIP = 77


def test_packaged_unit_under_a_real_systemd() -> None:
    result = subprocess.run(["bash", str(REPO / "scripts" / "systemd-e2e.sh")], capture_output=True, text=True, timeout=1200)
    if result.returncode == EXIT_SKIP:
        why = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "systemd-e2e.sh could not run here"
        if os.environ.get("CI"):  # this project's CI machines can run it: there a skip would hide a broken unit
            pytest.fail(f"CI must run the systemd end-to-end test: {why}")
        pytest.skip(why)
    assert result.returncode == 0, f"{result.stdout[-20000:]}\n{result.stderr[-5000:]}"
    print(result.stdout)
