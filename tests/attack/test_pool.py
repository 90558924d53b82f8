"""Attacks on the supervisor's process pool: programs that orphan helpers, a queue that hangs while a dead
worker's messages are given back, kills at the worst moment. Real supervisors, real programs and signals,
Azurite (behind testsupport.proxy.FaultProxy where the queue must misbehave), the IMDS simulator over HTTP.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from azure.storage.queue import QueueClient

from supervisor.simulator.server import ImdsSimulator
from testsupport.azurite import REPO, Azurite, connection_string
from testsupport.handlers import read_records
from testsupport.harness import RECORD_HANDLER, Supervisor, child_env
from testsupport.proxy import FaultProxy
from testsupport.queues import message_count, peek_texts
from testsupport.waiting import wait_until

PROGRAMS = REPO / "tests" / "programs"


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def parent_of(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except psutil.NoSuchProcess:
        return None


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    with FaultProxy(azurite.port, stall_s=120) as running:
        yield running


# --- strays ----------------------------------------------------------------------------------------------


def test_a_helper_a_running_program_orphans_neither_kills_the_program_nor_outlives_its_run(
        azurite: Azurite, queue: QueueClient, queue_name: str, tmp_path: Path,
        supervisors: Callable[..., Supervisor]) -> None:
    # Before: `( sleep 30 & )` handed the helper to the supervisor (a subreaper) while the program ran on; the stray
    # sweep killed the helper's process group, which is the running program's: the program died by SIGKILL, its
    # message failed, and (max_dequeue_count 1) was poisoned.
    helper_file = tmp_path / "helper"
    queue.send_message("x")
    env = child_env(azurite, queue_name=queue_name, workload_command=str(PROGRAMS / "orphans_a_helper.sh"),
                    queue_batch_size="1", queue_prefetch_s="0", queue_idle_poll_max_s="0.2",
                    queue_visibility_timeout_s="30", queue_max_dequeue_count="1", scaling_workers="1")
    env["PROG_PIDS"] = str(helper_file)
    sup = supervisors(env)
    helper = wait_until(lambda: int(helper_file.read_text()) if helper_file.exists() else None, 20,
                        lambda: f"the program to start its helper; log:\n{sup.log()[-3000:]}")
    wait_until(lambda: parent_of(helper) in (sup.pid, None), 5, "the helper to be orphaned to the supervisor")
    wait_until(lambda: message_count(queue) == 0, 20, lambda: f"the message to be settled; log:\n{sup.log()[-3000:]}")
    # The run is over: its group (the helper with it) is killed, though the helper was to sleep 30 s.
    wait_until(lambda: gone(helper), 5, lambda: f"the helper {helper} to die with its run; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGTERM)
    assert sup.wait(15) == 0
    log = sup.log()
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == [], log[-3000:]
    assert "1 done, 0 failed, 0 poisoned" in log, log[-3000:]


# --- a dead worker's messages, given back while the queue hangs --------------------------------------------


def test_an_eviction_is_acted_on_at_once_while_a_dead_workers_give_back_hangs(
        proxy: FaultProxy, queue: QueueClient, tmp_path: Path, simulator: ImdsSimulator,
        start_evictable: Callable[..., Supervisor]) -> None:
    # Before: the supervisor gave the dead worker's message back on its main loop, one timeout per attempt plus the
    # SDK's retries (about a minute); the notice waited for it, and so did signals, acknowledgements and pings.
    queue.send_message(json.dumps({"sleep": 120}))
    sup = start_evictable(extra_env={"SPOT_QUEUE_CONNECTION_STRING": connection_string(proxy.port)},
                          scaling_workers="1", workload_handler=RECORD_HANDLER, queue_batch_size="1",
                          queue_prefetch_s="0", queue_visibility_timeout_s="60")
    [started] = wait_until(lambda: read_records(tmp_path / "records.jsonl", "start"), 20,
                           lambda: f"the handler to start; log:\n{sup.log()[-3000:]}")
    proxy.set_fault("stall", methods=("PUT",))  # updates hang: the give-back of the held message among them
    stalled = proxy.stats.faults["stall"]
    os.kill(started["pid"], signal.SIGKILL)
    wait_until(lambda: proxy.stats.faults["stall"] > stalled, 10,
               lambda: f"the give-back to hang; log:\n{sup.log()[-3000:]}")

    notice = simulator.simulate_eviction(delay_s=30)
    noticed = time.monotonic()
    sup.wait_for_log("drain (Preempt", timeout=30)
    drain_began_after = time.monotonic() - noticed
    wait_until(lambda: simulator.acks(), 30, lambda: f"the acknowledgement; log:\n{sup.log()[-3000:]}")
    # One give-back call alone may take 10 s (a sixth of the 60 s lease); the notice is polled every 0.25 s.
    assert drain_began_after < 5.0, f"the drain began {drain_began_after:.1f}s after the notice; log:\n{sup.log()[-3000:]}"
    assert sup.stop_when_holding(notice["EventId"]) == 0


@pytest.mark.parametrize("fault", ["stall", "lost"])
def test_a_kill_while_a_dead_workers_give_back_is_in_flight_loses_nothing(
        fault: str, proxy: FaultProxy, queue: QueueClient, queue_name: str, azurite: Azurite, tmp_path: Path,
        start_evictable: Callable[..., Supervisor]) -> None:
    # The worker is killed holding a message, its give-back hangs (never sent, or its answer lost), and the
    # supervisor is killed too before it ends: the message must come back (after its lease at worst) and be done.
    go_on = tmp_path / "go-on"
    sent = queue.send_message(json.dumps({"wait_file": str(go_on), "timeout": 60}))
    records = tmp_path / "records.jsonl"
    through_proxy = {"SPOT_QUEUE_CONNECTION_STRING": connection_string(proxy.port)}
    spot = {"scaling_workers": "1", "workload_handler": RECORD_HANDLER, "queue_batch_size": "1",
            "queue_prefetch_s": "0", "queue_visibility_timeout_s": "6", "queue_idle_poll_max_s": "0.2"}
    sup = start_evictable(events=False, extra_env=through_proxy, **spot)
    [started] = wait_until(lambda: read_records(records, "start"), 20,
                           lambda: f"the handler to start; log:\n{sup.log()[-3000:]}")
    proxy.set_fault(fault, methods=("PUT",))
    stalled = proxy.stats.faults[fault]
    os.kill(started["pid"], signal.SIGKILL)
    wait_until(lambda: proxy.stats.faults[fault] > stalled, 10, lambda: f"the give-back to hang; log:\n{sup.log()[-3000:]}")
    sup.send(signal.SIGKILL)
    assert sup.wait(10) == -signal.SIGKILL

    proxy.set_fault("pass")
    go_on.touch()
    again = start_evictable(events=False, extra_env=through_proxy, **spot)
    wait_until(lambda: read_records(records, "end"), 30, lambda: f"the message to be done; log:\n{again.log()[-3000:]}")
    wait_until(lambda: message_count(queue) == 0, 10, "the delete")
    assert [(s["id"], s["dequeue_count"]) for s in read_records(records, "start")] == [(sent.id, 1), (sent.id, 2)]
    assert [e["outcome"] for e in read_records(records, "end")] == ["succeeded"]
    assert peek_texts(azurite.queue(f"{queue_name}-poison")) == []
    again.send(signal.SIGTERM)
    assert again.wait(15) == 0
