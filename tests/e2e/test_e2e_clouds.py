"""AWS and Google Cloud notices end to end: real supervisors, real workers, a real Azurite, the metadata
simulators over HTTP, the source picked by "auto" from fake DMI files."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from azure.storage.queue import QueueClient

from supervisor.simulator.metadata_http import MetadataServer
from supervisor.simulator.server import ImdsSimulator
from testsupport.clouds import DMI, aws_sim, control, gcp_sim, start_on_cloud
from testsupport.harness import REPO, Supervisor, processes_sample_work, run_plan, sample_results
from testsupport.queues import enqueue_sample_work

__all__ = ["aws_sim", "gcp_sim", "start_on_cloud"]  # fixtures


def drain_timeline(sup: Supervisor) -> dict[str, Any]:
    [line] = [line for line in sup.log().splitlines() if "drain timeline " in line]
    timeline: dict[str, Any] = json.loads(line.split("drain timeline ", 1)[1])
    return timeline


def finish_elsewhere(start_on_cloud: Callable[..., Supervisor], sim: MetadataServer, tmp_path: Path, total: int) -> None:
    """A replacement machine (no notices) finishes the queue: every message done once at least."""
    replacement = start_on_cloud(sim, events_source="none")
    replacement.wait_for(lambda: len({r["id"] for r in sample_results(tmp_path)}) == total, 90, "all messages done")
    replacement.proc.send_signal(signal.SIGTERM)
    assert replacement.proc.wait(20) == 0


# -- AWS -----------------------------------------------------------------------------------------


def test_aws_instance_action_drains_every_worker_before_its_time_and_loses_nothing(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    total = 24
    enqueue_sample_work(queue, total, chunks=20, chunk_ms=40)
    sup = start_on_cloud(aws_sim)
    sup.wait_for(lambda: len(sample_results(tmp_path)) >= 2, 60, "two messages done")  # 404s meanwhile: no drain
    assert "drain (" not in sup.log()
    action = control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 12})
    event_id = f"aws-spot-terminate-{action['time']}"
    assert sup.stop_when_holding(event_id, 20) == 0
    due = datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    timeline = drain_timeline(sup)
    assert timeline["events"] == [event_id] and timeline["drained_at"] < due - 5.0  # the safety margin
    log = sup.log()
    assert "events source: aws" in log and "auto: DMI sys_vendor is 'Amazon EC2'" in log
    assert "acknowledged scheduled event" not in log and not any(k.startswith("POST /latest") for k in aws_sim.request_counts())
    assert timeline["acknowledged_at"] is None
    assert len(sample_results(tmp_path)) < total, "the queue ran dry before the notice: nothing was tested"
    finish_elsewhere(start_on_cloud, aws_sim, tmp_path, total)
    assert queue.get_queue_properties().approximate_message_count == 0


def test_aws_token_is_renewed_in_service_on_expiry_and_after_a_401(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    control(aws_sim, "POST", "/simulate/token", {"max_ttl_s": 2})
    sup = start_on_cloud(aws_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    sup.wait_for(lambda: len(control(aws_sim, "GET", "/simulate/state")["token_requests"]) >= 3, 15, "two renewals")
    assert control(aws_sim, "GET", "/simulate/state")["unauthorised"] == 0
    control(aws_sim, "POST", "/simulate/token", {"max_ttl_s": 21600, "expire": True})
    sup.wait_for(lambda: control(aws_sim, "GET", "/simulate/state")["unauthorised"] == 1, 10, "a 401")
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work after the renewal")
    assert "poll failed" not in sup.log(), "a 401 renewed the token within the same poll"
    notice = control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 30})
    assert sup.stop_when_holding(f"aws-spot-terminate-{notice['time']}") == 0


@pytest.mark.parametrize("on_rebalance", ["ignore", "drain"])
def test_aws_rebalance_drains_only_when_on_rebalance_is_drain(
        on_rebalance: str, start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient,
        tmp_path: Path) -> None:
    sup = start_on_cloud(aws_sim, scaling_workers="1", events_on_rebalance=on_rebalance)
    sup.wait_for_log("ready:")
    control(aws_sim, "POST", "/simulate/rebalance")
    if on_rebalance == "drain":
        assert sup.stop_when_holding("aws-rebalance-") == 0
        return
    sup.wait_for_log("rebalance recommendation")
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work despite the rebalance recommendation")
    assert sup.log().count("rebalance recommendation") == 1 and "drain (" not in sup.log()
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


def test_aws_scale_in_drains_with_the_sigterm_deadline(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/lifecycle", {"state": "InService"})
    sup = start_on_cloud(aws_sim, scaling_workers="1", shutdown_drain_timeout_s="7")
    sup.wait_for_log("ready:")
    control(aws_sim, "POST", "/simulate/lifecycle", {"state": "Terminated"})
    assert sup.stop_when_holding("aws-asg-terminated") == 0
    timeline = drain_timeline(sup)
    assert 6.0 < timeline["deadline"] - timeline["started_at"] <= 7.0


def test_aws_withdrawn_instance_action_resumes(
        start_on_cloud: Callable[..., Supervisor], aws_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(aws_sim)
    sup.wait_for_log("ready:")
    notice = control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 60, "action": "stop"})
    sup.wait_for_log(f"holding until aws-spot-stop-{notice['time']}")
    control(aws_sim, "DELETE", "/simulate/eviction")  # the stopped instance was started again
    sup.wait_for_log("was cancelled")
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work after the withdrawn notice")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


# -- GCP -----------------------------------------------------------------------------------------


def test_gcp_preemption_drains_at_once_through_the_watch_not_the_poll(
        start_on_cloud: Callable[..., Supervisor], gcp_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    total = 16
    enqueue_sample_work(queue, total, chunks=20, chunk_ms=40)
    sup = start_on_cloud(gcp_sim, events_poll_interval_s="30")  # a poll would see it up to 30 s late
    sup.wait_for(lambda: len(sample_results(tmp_path)) >= 2, 60, "two messages done")
    sup.wait_for(lambda: control(gcp_sim, "GET", "/simulate/state")["watches"] >= 1, 10, "a watch in place")
    changed_at = control(gcp_sim, "POST", "/simulate/eviction")["at"]
    assert sup.stop_when_holding("gcp-preempted", 20) == 0
    timeline = drain_timeline(sup)
    # Well within the 30 s poll interval: the watch answered at once (bench/eviction_timing.py --cloud gcp measures it).
    assert timeline["started_at"] - changed_at < 5.0
    assert timeline["deadline"] - changed_at <= 30.0 - 5.0 + 1.0
    assert "events source: gcp" in sup.log()
    finish_elsewhere(start_on_cloud, gcp_sim, tmp_path, total)


def test_gcp_503s_and_a_hanging_watch_are_survived_and_a_later_preemption_is_seen(
        start_on_cloud: Callable[..., Supervisor], gcp_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(gcp_sim, scaling_workers="1")
    sup.wait_for_log("ready:")
    sup.wait_for(lambda: control(gcp_sim, "GET", "/simulate/state")["watches"] >= 1, 10, "a watch in place")
    control(gcp_sim, "POST", "/simulate/faults", {"mode": "503", "count": 6})
    sup.wait_for_log("poll failed", 15)
    control(gcp_sim, "POST", "/simulate/faults", {"mode": "hang", "count": 1000})
    sup.wait_for_log("polling instead", 30)
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work while the metadata server misbehaves")
    assert "drain (" not in sup.log() and sup.proc.poll() is None
    control(gcp_sim, "POST", "/simulate/eviction")
    assert sup.stop_when_holding("gcp-preempted", 20) == 0


def test_gcp_maintenance_that_ends_resumes(
        start_on_cloud: Callable[..., Supervisor], gcp_sim: MetadataServer, queue: QueueClient, tmp_path: Path) -> None:
    sup = start_on_cloud(gcp_sim)
    sup.wait_for_log("ready:")
    control(gcp_sim, "POST", "/simulate/maintenance", {"value": "TERMINATE_ON_HOST_MAINTENANCE"})
    sup.wait_for_log("holding until gcp-maintenance-terminate")
    control(gcp_sim, "POST", "/simulate/maintenance", {"value": "NONE"})
    sup.wait_for_log("was cancelled")
    processes_sample_work(sup, queue, tmp_path, 2, 30, "work after the maintenance notice went")
    sup.proc.send_signal(signal.SIGTERM)
    assert sup.proc.wait(20) == 0


# -- auto ----------------------------------------------------------------------------------------


def test_auto_picks_each_cloud_from_dmi_and_plan_names_it(
        supervisors: Callable[..., Supervisor], aws_sim: MetadataServer, gcp_sim: MetadataServer, tmp_path: Path) -> None:
    base = {"SPOT_QUEUE_CONNECTION_STRING": "UseDevelopmentStorage=true", "SPOT_COST_ENABLED": "false",
            "SPOT_EVENTS_SOURCE": "auto", "PYTHONPATH": str(REPO)}
    with ImdsSimulator(vm_name="vm-spot-07", vm_size="Standard_D4s_v5") as azure:
        expected = {"aws-nitro": (aws_sim.url, "aws", "i-0abc1234def567890", "m5.large"),
                    "aws-xen": (aws_sim.url, "aws", "i-0abc1234def567890", "m5.large"),
                    "gcp": (gcp_sim.url, "gcp", "spot-render-07", "n2-standard-4"),
                    "azure": (azure.url, "azure", "vm-spot-07", "Standard_D4s_v5"),
                    "unknown": ("", "none", None, None)}
        for dmi, (url, source, vm_name, vm_size) in expected.items():
            env = {**base, "SPOT_EVENTS_DMI_DIR": str(DMI / dmi), "SPOT_EVENTS_ENDPOINT": url}
            plan = run_plan(supervisors, env)
            assert (plan["events_source"], plan["vm_name"], plan["vm_size"]) == (source, vm_name, vm_size), (dmi, plan)
            assert plan["events_source_why"].startswith("auto: ")
    text = supervisors({**base, "SPOT_EVENTS_DMI_DIR": str(tmp_path / "no-such-dir")}, "plan")
    assert text.wait(20) == 0
    assert text.proc.stdout is not None and "events:   none (auto: no cloud recognised" in text.proc.stdout.read().decode()
    info = [line for line in text.log().splitlines() if "events source:" in line]
    assert len(info) == 1 and " INFO " in info[0] and "WARNING" not in text.log()


def test_prices_on_aws_says_they_are_not_available_there(supervisors: Callable[..., Supervisor]) -> None:
    env = {"SPOT_QUEUE_CONNECTION_STRING": "UseDevelopmentStorage=true", "SPOT_EVENTS_SOURCE": "aws",
           "SPOT_EVENTS_ENDPOINT": "http://127.0.0.1:9"}
    sup = supervisors(env, "prices")
    assert sup.wait(20) == 1
    lines = sup.log().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prices: not available on AWS"), lines
