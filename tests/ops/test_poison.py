"""`spot-supervisor poison list | requeue | purge` against a real Azurite, on messages
that a failing handler in a real `spot-supervisor run` poisoned; and the note that
says why, stored with each poisoned message.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
from pathlib import Path

from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from testsupport.harness import RECORD_HANDLER, child_env
from testsupport.waiting import wait_until
from worker.message import MAX_MESSAGE_BYTES
from worker.queue.poisoned import POISON_MARKER, poisoned_text, read_poisoned

_SCRIPT = Path(sys.executable).with_name("spot-supervisor")
CLI = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "supervisor"]


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def peek(client: QueueClient) -> list[str]:
    try:
        return [m.content for m in client.peek_messages(max_messages=32)]
    except Exception:
        return []


def count(client: QueueClient) -> int:
    return len(peek(client))


def run_until_poisoned(env: dict[str, str], poison: QueueClient, main: QueueClient, n: int, tmp_path: Path) -> None:
    """`spot-supervisor run` with the failing handler until n messages are in the poison queue, then SIGTERM."""
    with (tmp_path / "supervisor.log").open("ab") as log:
        proc = subprocess.Popen([*CLI, "run"], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        try:
            wait_until(lambda: count(poison) == n and count(main) == 0, 30,
                       lambda: f"{n} poisoned messages; log:\n{(tmp_path / 'supervisor.log').read_text()[-2000:]}")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_list_requeue_purge_what_a_failing_handler_poisoned(azurite: Azurite, queue: QueueClient, queue_name: str,
                                                           tmp_path: Path) -> None:
    env = child_env(azurite, queue_name=queue_name, workload_handler=RECORD_HANDLER, scaling_workers="1",
                    queue_max_dequeue_count="1", queue_idle_poll_max_s="0.2", shutdown_drain_timeout_s="5")
    env["TEST_HANDLER_RECORD"] = str(tmp_path / "record.jsonl")
    poison = azurite.queue(f"{queue_name}-poison")
    bodies = [json.dumps({"fail": True, "n": i, "text": "grüße ✓"}, ensure_ascii=False) for i in range(3)]
    sent = {m.id: m for m in (queue.send_message(body) for body in bodies)}
    run_until_poisoned(env, poison, queue, 3, tmp_path)

    listed = cli(env, "poison", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    data = json.loads(listed.stdout)
    assert (data["queue"], data["approximate_count"], len(data["messages"])) == (f"{queue_name}-poison", 3, 3)
    by_original = {m["original_id"]: m for m in data["messages"]}
    assert set(by_original) == set(sent)
    for original_id, m in by_original.items():
        assert m["reason"] == "handler failed 1 times (max_dequeue_count 1); last: RuntimeError: failing on purpose (attempt 1)"
        assert m["dequeue_count"] == 1
        assert m["body_preview"] == sent[original_id].content
        assert m["body_bytes"] == len(sent[original_id].content.encode())
        assert m["inserted_on"] == sent[original_id].inserted_on.isoformat()
    text = cli(env, "poison", "list")
    assert text.returncode == 0 and f"{queue_name}-poison: 3 message(s)\n" in text.stdout
    assert text.stdout.count("why:  handler failed 1 times (max_dequeue_count 1); last: RuntimeError: failing on purpose") == 3
    limited = json.loads(cli(env, "poison", "list", "--json", "--limit", "2").stdout)
    assert len(limited["messages"]) == 2 and limited["approximate_count"] == 3
    assert f"{queue_name}-poison: about 3 message(s), showing the oldest 1\n" in cli(env, "poison", "list", "--limit", "1").stdout

    first = next(m for m in data["messages"])
    one = cli(env, "poison", "requeue", first["id"])
    assert (one.returncode, one.stdout.strip()) == (0, f"requeued 1 message(s) from {queue_name}-poison to {queue_name}")
    assert peek(queue) == [sent[first["original_id"]].content]  # the original text, byte for byte, no note
    assert count(poison) == 2

    missing = cli(env, "poison", "requeue", "no-such-id")
    assert missing.returncode == 1
    assert missing.stdout.strip() == f"requeued 0 message(s) from {queue_name}-poison to {queue_name}"
    assert missing.stderr.strip() == f"poison requeue: not in {queue_name}-poison: no-such-id"
    assert count(poison) == 2  # what it looked through is visible again at once

    rest = cli(env, "poison", "requeue", "--all")
    assert (rest.returncode, rest.stdout.strip()) == (0, f"requeued 2 message(s) from {queue_name}-poison to {queue_name}")
    assert sorted(peek(queue)) == sorted(bodies) and count(poison) == 0

    # Requeued messages are fresh: they fail once more and are poisoned again after one attempt.
    run_until_poisoned(env, poison, queue, 3, tmp_path)
    again = json.loads(cli(env, "poison", "list", "--json").stdout)["messages"]
    assert {m["dequeue_count"] for m in again} == {1} and {m["body_preview"] for m in again} == set(bodies)

    refused = cli(env, "poison", "purge")
    assert refused.returncode == 2 and "add --yes" in refused.stderr and count(poison) == 3
    purged = cli(env, "poison", "purge", "--yes")
    assert (purged.returncode, purged.stdout.strip()) == (0, f"purged about 3 message(s) from {queue_name}-poison")
    assert count(poison) == 0
    assert cli(env, "poison", "list").stdout.strip() == f"{queue_name}-poison: empty"


def test_requeue_keeps_base64_text_and_notes_from_elsewhere(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    env = child_env(azurite, queue_name=queue_name, queue_message_encoding="base64")
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    encoded = base64.b64encode("日本語 payload".encode()).decode("ascii")
    poison.send_message(poisoned_text(encoded, "undecodable? no: a test", "orig-1", 4))
    poison.send_message("plain text some other tool poisoned")  # no note: reason unknown
    listed = {m["body_preview"]: m for m in json.loads(cli(env, "poison", "list", "--json").stdout)["messages"]}
    assert listed["日本語 payload"]["reason"] == "undecodable? no: a test" and listed["日本語 payload"]["dequeue_count"] == 4
    unknown = next(m for body, m in listed.items() if body.startswith("plain text"))
    assert (unknown["reason"], unknown["dequeue_count"], unknown["original_id"]) == (None, None, None)
    assert "[not valid base64" in unknown["body_preview"]  # shown as stored, with why it is not decodable
    moved = cli(env, "poison", "requeue", "--all")
    assert moved.returncode == 0, moved.stderr
    assert sorted(peek(queue)) == sorted([encoded, "plain text some other tool poisoned"])


def test_usage_and_queue_errors_are_one_line(azurite: Azurite, queue_name: str) -> None:
    env = child_env(azurite, queue_name=queue_name)
    for args in (("requeue",), ("requeue", "--all", "x"), ("list", "--limit", "33"), ("list", "--limit", "x")):
        done = cli(env, "poison", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
    nothing = cli(env, "poison", "list", "--json")
    assert nothing.returncode == 0 and json.loads(nothing.stdout) == {"queue": f"{queue_name}-poison", "approximate_count": 0,
                                                                      "messages": []}
    assert cli(env, "poison", "requeue", "--all").stdout.strip() == f"requeued 0 message(s) from {queue_name}-poison to {queue_name}"
    down = cli({**env, "SPOT_QUEUE_CONNECTION_STRING": env["SPOT_QUEUE_CONNECTION_STRING"].replace(str(azurite.port), "9"),
                "SPOT_QUEUE_REQUEST_TIMEOUT_S": "2"}, "poison", "list")
    assert down.returncode == 1 and "Traceback" not in down.stderr
    assert len(down.stderr.strip().splitlines()) == 1 and down.stderr.startswith("poison: "), down.stderr


def test_note_round_trip_and_limits() -> None:
    original = '{"a": 1}\nsecond line ✓'
    text = poisoned_text(original, "handler failed 5 times\nwith a newline", "id-1", 5)
    assert text.startswith(POISON_MARKER) and text.count("\n") == 2  # header is one line; the original keeps its own
    back, note = read_poisoned(text)
    assert back == original and note is not None
    assert (note.reason, note.message_id, note.dequeue_count) == ("handler failed 5 times\nwith a newline", "id-1", 5)
    huge = "x" * (MAX_MESSAGE_BYTES - 10)
    assert poisoned_text(huge, "too big for a note") == huge  # the original alone: nothing lost, reason unknown
    for text in (POISON_MARKER + "{not json\nbody", POISON_MARKER + '{"no_reason": 1}\nbody', POISON_MARKER + "no newline"):
        assert read_poisoned(text) == (text, None)
    deep = POISON_MARKER + "[" * 100_000 + "\nbody"
    assert read_poisoned(deep) == (deep, None)




def test_a_note_look_alike_that_was_not_written_for_this_text_is_producer_text(
        azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    """Issue 21: `poison requeue` stripped a producer's own first line when it merely looked like our note, and
    `poison list` showed its made-up reason. A note is ours only when it names the digest of the text after it."""
    env = child_env(azurite, queue_name=queue_name)
    poison = azurite.queue(f"{queue_name}-poison")
    poison.create_queue()
    ours = poisoned_text("the real body", "handler failed", "orig-1", 5)
    header = ours.split("\n", 1)[0]
    look_alike = f"{header}\nsomething else entirely"  # a producer's text, poisoned without a note (too big, another tool)
    legacy = '#spot-supervisor-poisoned/1 {"reason":"old note","message_id":"m","dequeue_count":3}\nold body'
    for text in (look_alike, ours, legacy):
        poison.send_message(text)
    listed = {m["body_preview"]: m for m in json.loads(cli(env, "poison", "list", "--json").stdout)["messages"]}
    assert listed["the real body"]["reason"] == "handler failed"
    assert listed["old body"]["reason"] == "old note"  # written by version 1: still read
    fake = next(m for body, m in listed.items() if body not in ("the real body", "old body"))
    assert fake["body_preview"].startswith("#spot-supervisor-poisoned/2 ")
    assert fake["reason"] is None and fake["original_id"] is None
    assert cli(env, "poison", "requeue", "--all").returncode == 0
    assert sorted(peek(queue)) == sorted([look_alike, "the real body", "old body"])
