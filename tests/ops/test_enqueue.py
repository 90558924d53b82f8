"""`spot-supervisor enqueue`: generated messages, lines of a file, encodings, limits."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.harness import child_env


def enqueue(azurite: Azurite, queue_name: str, *args: str, **spot: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "enqueue", *args], capture_output=True, text=True,
                          env=child_env(azurite, queue_name=queue_name, **spot), timeout=60)


def texts(queue: QueueClient) -> list[str]:
    return sorted(m.content for m in queue.receive_messages(max_messages=32, messages_per_page=32))


def test_count_creates_the_queue_and_sends_sample_messages(azurite: Azurite, queue_name: str) -> None:
    result = enqueue(azurite, queue_name, "--count", "5", "--chunks", "3", "--chunk-ms", "7")
    assert result.returncode == 0, result.stderr
    assert f"enqueued 5 message(s) on {queue_name}" in result.stdout
    bodies = [json.loads(t) for t in texts(azurite.queue(queue_name))]
    assert sorted(b["n"] for b in bodies) == [0, 1, 2, 3, 4]
    assert {(b["chunks"], b["chunk_ms"]) for b in bodies} == {(3, 7.0)}


def test_file_lines_in_base64_as_azure_functions_reads_them(azurite: Azurite, queue_name: str, tmp_path: Path) -> None:
    lines = tmp_path / "jobs.txt"
    lines.write_text("first job\n\nzweiter Auftrag: grün\r\n")
    result = enqueue(azurite, queue_name, "--file", str(lines), queue_message_encoding="base64")
    assert result.returncode == 0, result.stderr
    decoded = sorted(base64.b64decode(t).decode("utf-8") for t in texts(azurite.queue(queue_name)))
    assert decoded == ["first job", "zweiter Auftrag: grün"]


def test_an_oversized_line_sends_nothing_and_says_so_in_one_line(azurite: Azurite, queue_name: str, tmp_path: Path) -> None:
    lines = tmp_path / "jobs.txt"
    lines.write_text("small\n" + "x" * 70_000 + "\n")
    result = enqueue(azurite, queue_name, "--file", str(lines))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "message 2 is 70000 bytes" in result.stderr
    assert texts(azurite.queue(queue_name)) == []


def test_an_unreachable_queue_is_one_line_and_exit_1(azurite: Azurite, queue_name: str) -> None:
    dead = azurite.connection_string.replace(f":{azurite.port}/", ":9/")
    result = enqueue(azurite, queue_name, "--count", "1", queue_connection_string=dead, queue_request_timeout_s="2")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("enqueue: "), result.stderr



def test_a_binary_file_is_one_line_and_sends_nothing(azurite: Azurite, queue_name: str, tmp_path: Path) -> None:
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"first line\n" + bytes(range(256)) * 40 + b"\n")
    result = enqueue(azurite, queue_name, "--file", str(binary))
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "not UTF-8 text" in result.stderr and "nothing was sent" in result.stderr
    assert "Traceback" not in result.stderr
    assert texts(azurite.queue(queue_name)) == []


def test_blank_and_whitespace_only_lines_are_not_messages(azurite: Azurite, queue_name: str, tmp_path: Path) -> None:
    lines = tmp_path / "jobs.txt"
    lines.write_text("one\n   \n\t\n \t \r\n\n  two  \n")
    result = enqueue(azurite, queue_name, "--file", str(lines))
    assert result.returncode == 0, result.stderr
    assert "enqueued 2 message(s)" in result.stdout
    assert texts(azurite.queue(queue_name)) == ["  two  ", "one"]  # a real line is sent as it is


def test_standard_input_that_is_not_utf8_is_one_line(azurite: Azurite, queue_name: str) -> None:
    result = subprocess.run([sys.executable, "-m", "supervisor", "enqueue", "--file", "-"], input=b"ok\n\xff\xfe\x00\n",
                            capture_output=True, env=child_env(azurite, queue_name=queue_name), timeout=60)
    assert result.returncode == 1, result.stderr
    assert result.stderr.decode().strip().count("\n") == 0 and b"standard input is not UTF-8" in result.stderr


@pytest.mark.parametrize(("option", "value"), [("--count", "-5"), ("--count", "0"), ("--count", "many"),
                                               ("--chunks", "0"), ("--chunk-ms", "-1"), ("--chunk-ms", "inf")])
def test_impossible_numbers_are_refused_before_anything_is_sent(azurite: Azurite, queue_name: str, option: str,
                                                                value: str) -> None:
    args = [option, value] if option == "--count" else ["--count", "1", option, value]
    result = enqueue(azurite, queue_name, *args)
    assert result.returncode == 2, result.stderr
    assert f"argument {option}" in result.stderr and value in result.stderr
    assert "Traceback" not in result.stderr
