"""Attacks on the AWS and GCP notice sources, through real supervisors and the metadata simulators:
garbage and hostile JSON from every path, a watch that hangs, 401 storms, a token endpoint that is
down, a metadata service without IMDSv2. Each is a failed poll (one WARNING a minute at most), never
a drain; work goes on, and a real notice afterwards is still seen."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from supervisor.simulator.metadata_http import MetadataServer
from testsupport.clouds import aws_sim, control, gcp_sim, start_on_cloud
from testsupport.harness import Supervisor, processes_sample_work
from testsupport.hostile.clouds import GARBAGE_ANSWERS

__all__ = ["aws_sim", "gcp_sim", "start_on_cloud"]  # fixtures


def warnings_about_polls(sup: Supervisor) -> list[str]:
    return [line for line in sup.log().splitlines() if " WARNING " in line and "poll failed" in line]


def then_a_notice_still_drains(sup: Supervisor, sim: MetadataServer) -> None:
    answer = control(sim, "POST", "/simulate/eviction", {"delay_s": 60} if sim.model.cloud == "aws" else {})
    assert sup.stop_when_holding(f"aws-spot-terminate-{answer['time']}" if sim.model.cloud == "aws" else "gcp-preempted",
                                 30) == 0


@pytest.mark.parametrize(("cloud", "path", "body"), GARBAGE_ANSWERS,
                         ids=[f"{c}-{p}-{i}" for i, (c, p, _) in enumerate(GARBAGE_ANSWERS)])
def test_garbage_from_any_path_is_a_failed_poll_logged_once_never_a_drain(
        cloud: str, path: str, body: str, start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer,
        gcp_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sim = aws_sim if cloud == "aws" else gcp_sim
    sup = start_on_cloud(sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    control(sim, "POST", "/simulate/raw", {"path": path, "status": 200, "body": body})
    sup.wait_for_log("poll failed", 15)
    polls_before = sum(sim.request_counts().values())
    processes_sample_work(sup, queue, tmp_path, 3, 30, "work while the metadata service talks garbage")
    sup.wait_for(lambda: sum(sim.request_counts().values()) > polls_before + 2, 15, "polls going on (backing off)")
    assert sup.proc.poll() is None and "drain (" not in sup.log()
    assert len(warnings_about_polls(sup)) == 1, warnings_about_polls(sup)
    assert "Traceback" not in sup.log()
    control(sim, "DELETE", "/simulate/raw")
    sup.wait_for_log("answering again", 15)
    then_a_notice_still_drains(sup, sim)


def test_a_watch_that_never_answers_still_lets_a_preemption_through_in_time(
        start_on_cloud: Callable[..., Supervisor], gcp_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(gcp_sim, scaling_workers="1", events_poll_interval_s="1")
    sup.wait_for_log("ready:")
    control(gcp_sim, "POST", "/simulate/faults", {"mode": "hang", "count": 100_000})
    sup.wait_for_log("polling instead", 30)
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work while every watch hangs")
    changed_at = control(gcp_sim, "POST", "/simulate/eviction")["at"]
    assert sup.stop_when_holding("gcp-preempted", 20) == 0
    [line] = [line for line in sup.log().splitlines() if "drain timeline " in line]
    started_at = float(line.split('"started_at":', 1)[1].split(",", 1)[0])
    assert started_at - changed_at < 10.0, "the fall-back polls did not see the preemption well within its 30 s"


def test_a_401_storm_is_failed_polls_with_one_token_request_each_at_most(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(aws_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    control(aws_sim, "POST", "/simulate/faults", {"mode": "401", "count": 100_000})
    sup.wait_for_log("poll failed", 15)
    processes_sample_work(sup, queue, tmp_path, 3, 30, "work during the 401 storm")
    counts = aws_sim.request_counts()
    assert counts["PUT /latest/api/token"] <= counts["GET /latest/meta-data/spot/instance-action"]
    assert len(warnings_about_polls(sup)) == 1 and "drain (" not in sup.log()
    control(aws_sim, "POST", "/simulate/faults", {"mode": "401", "count": 0})
    sup.wait_for_log("answering again", 15)
    then_a_notice_still_drains(sup, aws_sim)


def test_token_endpoint_down_is_failed_polls_then_recovers(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(aws_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    control(aws_sim, "POST", "/simulate/token", {"expire": True})
    control(aws_sim, "POST", "/simulate/faults", {"mode": "token-down", "count": 100_000})
    sup.wait_for_log("no session token", 15)
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work while the token endpoint is down")
    assert len(warnings_about_polls(sup)) == 1 and "drain (" not in sup.log()
    control(aws_sim, "POST", "/simulate/faults", {"mode": "token-down", "count": 0})
    sup.wait_for_log("answering again", 15)
    then_a_notice_still_drains(sup, aws_sim)


def test_imdsv1_only_works_without_tokens_and_does_not_hammer_the_token_endpoint(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    control(aws_sim, "POST", "/simulate/faults", {"mode": "imdsv1"})
    sup = start_on_cloud(aws_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work on an IMDSv1-only service")
    assert aws_sim.request_counts()["PUT /latest/api/token"] <= 2  # plan's look-up, then the watcher's
    assert "poll failed" not in sup.log()
    then_a_notice_still_drains(sup, aws_sim)


def test_a_metadata_service_that_resets_every_connection_is_survived(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(aws_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    control(aws_sim, "POST", "/simulate/faults", {"mode": "reset", "count": 40})
    sup.wait_for_log("poll failed", 15)
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work while connections are reset")
    assert "drain (" not in sup.log() and "Traceback" not in sup.log()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0
