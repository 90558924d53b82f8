"""Log lines: sd-daemon priority prefixes under journald, the plain format elsewhere;
the version and commit in the supervisor's start-up line.

journald itself is exercised by scripts/systemd-e2e.sh (tests/e2e/test_systemd_e2e.py):
there `journalctl -p warning` shows the drain deadline and `-p err` the configuration error.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from supervisor.build_info import describe_build, package_version
from worker.telemetry.logs import JournalFormatter, sd_priority

REPO = Path(__file__).resolve().parent.parent

EMIT = """
import logging, sys
from worker.telemetry.logs import setup_logging
setup_logging("INFO", "worker-3")
log = logging.getLogger("worker.queue.consumer")
log.info("plain news")
log.warning("lease lost")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("handler failed")
"""


def emit(tmp_path: Path, journal: bool) -> list[str]:
    """Run EMIT in a child whose stderr is a file; with journal=True, JOURNAL_STREAM names that file
    (device:inode), as systemd does for the stream it connects to a service's stderr."""
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO)
    with out.open("wb") as stderr:
        if journal:
            st = os.fstat(stderr.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", EMIT], stderr=stderr, env=env, check=True, timeout=60)
    return out.read_text().splitlines()


def test_under_journald_every_line_carries_its_priority_and_no_timestamp(tmp_path: Path) -> None:
    lines = emit(tmp_path, journal=True)
    pid = re.match(r"<6>worker-3\[(\d+)\] ", lines[0])
    assert pid, lines
    assert lines[0] == f"<6>worker-3[{pid.group(1)}] worker.queue.consumer: plain news"
    assert lines[1] == f"<4>worker-3[{pid.group(1)}] worker.queue.consumer: lease lost"
    assert lines[2].startswith("<3>worker-3[") and lines[2].endswith("handler failed")
    traceback = lines[3:]
    assert traceback[0] == "<3>Traceback (most recent call last):" and traceback[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in traceback)  # journald keeps the whole traceback at err


def test_on_a_file_or_terminal_lines_are_plain_with_a_timestamp(tmp_path: Path) -> None:
    lines = emit(tmp_path, journal=False)
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} INFO    worker-3\[\d+\] worker\.queue\.consumer: plain news", lines[0]), lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} WARNING worker-3\[\d+\] worker\.queue\.consumer: lease lost", lines[1])
    assert not any(line.startswith("<") for line in lines)


def test_a_journal_stream_of_another_file_is_not_ours(tmp_path: Path) -> None:
    """A service's child whose stderr was redirected elsewhere inherits JOURNAL_STREAM: it must not prefix."""
    other = tmp_path / "other"
    other.write_text("")
    st = os.stat(other)
    out = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
    with out.open("wb") as stderr:
        subprocess.run([sys.executable, "-c", EMIT], stderr=stderr, env=env, check=True, timeout=60)
    assert not out.read_text().startswith("<")


def test_sd_daemon_levels() -> None:
    assert [sd_priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)] == \
        [7, 6, 4, 3, 2]
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a\nb", None, None)
    assert JournalFormatter("%(message)s").format(record) == "<4>a\n<4>b"


def test_config_error_is_an_err_line_under_journald(tmp_path: Path) -> None:
    out = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update(SPOT_QUEUE_CONNECTION_STRING="UseDevelopmentStorage=true", SPOT_SCALING_WORKERS="lots")
    with out.open("wb") as stderr:
        st = os.fstat(stderr.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        result = subprocess.run([sys.executable, "-m", "supervisor", "run"], stderr=stderr, env=env, timeout=60)
    assert result.returncode == 78
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and lines[0].startswith("<3>") and "scaling.workers" in lines[0], lines


def test_start_up_line_names_the_version_and_the_commit_of_build_info(tmp_path: Path) -> None:
    version = package_version()
    assert describe_build(tmp_path) == f"spot-supervisor {version} (no BUILD_INFO: not installed by orchestrate.sh)"
    (tmp_path / "BUILD_INFO").write_text(f"name=spot-supervisor\nversion={version}\ncommit=1a2b3c4\ntree=clean\n")
    assert describe_build(tmp_path) == f"spot-supervisor {version} (commit 1a2b3c4)"
    (tmp_path / "BUILD_INFO").write_text(f"version={version}\ncommit=1a2b3c4\ntree=modified\n")
    assert describe_build(tmp_path) == f"spot-supervisor {version} (commit 1a2b3c4, modified tree)"
