"""Programs as handlers, the pure parts: settings of [workload] command, command resolution,
output lines. (The behaviour with real programs, signals and Azurite: test_program.py.)"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from testsupport.harness import REPO
from worker.programs.command import resolve_command
from worker.programs.files import CUT_MARK, OutputLines
from worker.settings import ConfigError, load_settings

TESTS = REPO / "tests"
BASE_ENV = {"SPOT_QUEUE_CONNECTION_STRING": "UseDevelopmentStorage=true", "SPOT_EVENTS_SOURCE": "none"}


@pytest.mark.parametrize(("env", "key"), [
    ({"SPOT_WORKLOAD_COMMAND": "render 'unbalanced"}, "workload.command"),
    ({"SPOT_WORKLOAD_COMMAND": "   "}, "workload.command"),
    ({"SPOT_WORKLOAD_STOP_SIGNAL": "TERM"}, "workload.stop_signal"),
    ({"SPOT_WORKLOAD_STOP_SIGNAL": "SIGKILL"}, "workload.stop_signal"),
    ({"SPOT_WORKLOAD_STOP_SIGNAL": "SIG_IGN"}, "workload.stop_signal"),
    ({"SPOT_WORKLOAD_TIMEOUT_S": "-1"}, "workload.timeout_s"),
    ({"SPOT_WORKLOAD_TIMEOUT_S": "soon"}, "workload.timeout_s (from SPOT_WORKLOAD_TIMEOUT_S)"),
])
def test_bad_workload_values_are_one_line_naming_the_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={**BASE_ENV, **env})
    assert info.value.key == key and "\n" not in str(info.value)


def test_workload_program_settings_from_the_environment() -> None:
    s = load_settings(None, environ={**BASE_ENV, "SPOT_WORKLOAD_COMMAND": "/opt/render --fast 'two words'",
                                     "SPOT_WORKLOAD_STOP_SIGNAL": "SIGUSR1", "SPOT_WORKLOAD_TIMEOUT_S": "90"})
    assert (s.workload.command, s.workload.stop_signal, s.workload.timeout_s) == ("/opt/render --fast 'two words'", "SIGUSR1", 90.0)


def test_resolve_command_splits_with_shell_rules_and_finds_the_program(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    tool = tmp_path / "bin" / "render"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    assert resolve_command("render --out 'a b' \"c\"") == [str(tool), "--out", "a b", "c"]
    monkeypatch.chdir(tmp_path)
    assert resolve_command("./bin/render $HOME") == [str(tool), "$HOME"]  # no shell: no expansion


@pytest.mark.parametrize(("command", "problem"), [("/no/such/tool", "no such file"), ("/tmp", "not an executable file"),
                                                  ("no-such-tool-anywhere", "not found on PATH")])
def test_resolve_command_refuses_what_cannot_run(command: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_command(command)
    assert info.value.key == "workload.command" and problem in str(info.value)


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def output(chunks: list[bytes], max_line_bytes: int = 8) -> list[str]:
    collect = Collect()
    logger = logging.getLogger(f"test.output.{id(collect)}")
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lines = OutputLines("m1", "stdout", logger, max_line_bytes)
    for chunk in chunks:
        lines.feed(chunk)
    lines.close()
    return [line.removeprefix("message m1 stdout: ") for line in collect.lines]


def test_output_lines_across_chunks_and_a_last_line_without_newline() -> None:
    assert output([b"ab", b"c\nde", b"f\r\n", b"\n", b"tail"]) == ["abc", "def", "", "tail"]


def test_output_long_lines_are_cut_once_and_the_rest_dropped() -> None:
    assert output([b"0123456789abcdef\nok\n"]) == ["01234567" + CUT_MARK, "ok"]
    assert output([b"0123", b"4567", b"89", b"ab\nok"]) == ["01234567" + CUT_MARK, "ok"]
    assert output([b"01234567\n"]) == ["01234567"]  # exactly the limit: not cut
    assert output([b"x" * 100]) == ["x" * 8 + CUT_MARK]


def test_output_is_decoded_leniently() -> None:
    assert output([b"caf\xc3\xa9 \xff\n"], 64) == ["café \ufffd"]


@pytest.mark.parametrize("script", sorted([*(REPO / "examples").glob("*.sh"), *(TESTS / "programs").glob("*.sh")]),
                         ids=lambda p: p.name)
def test_program_scripts_are_posix_sh_and_shellcheck_clean(script: Path) -> None:
    assert script.read_text().startswith("#!/bin/sh\n") and os.access(script, os.X_OK)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/ci-deps.sh installs it)")
    subprocess.run(["shellcheck", "--shell=sh", str(script)], check=True)
