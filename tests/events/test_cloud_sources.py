"""The AWS and GCP notice sources against the metadata simulators over real HTTP, and the simulators'
shapes against the documented fixtures."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import pytest

from supervisor.config import EventsSettings
from supervisor.events.aws import AwsInstanceMetadata
from supervisor.events.eviction import EvictionNotice, EvictionPolicy, NoticeWithdrawn
from supervisor.events.gcp import GcpMetadata
from supervisor.simulator.metadata_http import MetadataServer
from supervisor.vm.imds import ImdsError
from testsupport.azurite import REPO
from testsupport.clouds import FIXTURES, aws_sim, control, gcp_sim
from testsupport.net import free_port, wait_for_port

__all__ = ["aws_sim", "gcp_sim"]  # fixtures

INSTANCE_ID = "i-0abc1234def567890"


@pytest.fixture
def aws(aws_sim: MetadataServer) -> Iterator[AwsInstanceMetadata]:
    with AwsInstanceMetadata(aws_sim.url, 1.0, INSTANCE_ID, unannounced_notice_s=25.0) as source:
        yield source


@pytest.fixture
def gcp(gcp_sim: MetadataServer) -> Iterator[GcpMetadata]:
    with GcpMetadata(gcp_sim.url, 1.0, "spot-render-07", watch_timeout_s=2) as source:
        yield source


def policy(name: str, **settings: object) -> EvictionPolicy:
    return EvictionPolicy(name, EventsSettings(**settings), acknowledges=False)  # type: ignore[arg-type]


# -- the simulators serve the documented shapes --------------------------------------------------


def test_aws_simulator_serves_the_documented_shapes(aws_sim: MetadataServer) -> None:
    put = httpx.put(f"{aws_sim.url}/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600"})
    assert put.status_code == 200 and put.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    token = {"X-aws-ec2-metadata-token": put.text}
    meta = f"{aws_sim.url}/latest/meta-data/"
    assert httpx.get(meta + "spot/instance-action").status_code == 401  # no token: v2 required
    assert httpx.get(meta + "spot/instance-action", headers=token).status_code == 404
    control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 120})
    control(aws_sim, "POST", "/simulate/rebalance")
    served = httpx.get(meta + "spot/instance-action", headers=token).json()
    documented = json.loads((FIXTURES / "aws" / "spot-instance-action.json").read_text())
    assert served.keys() == documented.keys() and served["action"] == "terminate"
    assert served["time"].endswith("Z") and len(served["time"]) == len(documented["time"])
    rebalance = httpx.get(meta + "events/recommendations/rebalance", headers=token).json()
    assert rebalance.keys() == json.loads((FIXTURES / "aws" / "rebalance.json").read_text()).keys()
    assert httpx.get(meta + "instance-life-cycle", headers=token).text == "spot"
    assert httpx.put(f"{aws_sim.url}/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": "21600",
                                                                 "X-Forwarded-For": "10.0.0.1"}).status_code == 403


def test_gcp_simulator_serves_the_documented_shapes(gcp_sim: MetadataServer) -> None:
    base = f"{gcp_sim.url}/computeMetadata/v1/instance/"
    flavor = {"Metadata-Flavor": "Google"}
    assert httpx.get(base + "preempted").status_code == 403
    first = httpx.get(base + "preempted", headers=flavor)
    assert first.text == "FALSE" and first.headers["Metadata-Flavor"] == "Google" and first.headers["ETag"]
    assert httpx.get(base + "machine-type", headers=flavor).text == "projects/123456789/machineTypes/n2-standard-4"
    assert httpx.get(base + "maintenance-event", headers=flavor).text == "NONE"
    threading.Timer(0.3, control, (gcp_sim, "POST", "/simulate/eviction")).start()
    began = time.monotonic()
    watched = httpx.get(base + "preempted", headers=flavor, timeout=10,
                        params={"wait_for_change": "true", "last_etag": first.headers["ETag"], "timeout_sec": "5"})
    assert watched.text == "TRUE" and watched.headers["ETag"] != first.headers["ETag"]
    assert 0.2 < time.monotonic() - began < 4


# -- AWS -----------------------------------------------------------------------------------------


def test_aws_404_is_no_notice_and_an_instance_action_is_a_preempt_due_at_its_time(
        aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    p = policy(INSTANCE_ID, safety_margin_s=5.0)
    for _ in range(3):
        assert p.observe(aws.poll(), time.time()) == []
    action = control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 120, "action": "stop"})
    [notice] = p.observe(aws.poll(), time.time())
    assert isinstance(notice, EvictionNotice) and notice.event.event_type == "Preempt" and not notice.acknowledge
    due = datetime.strptime(action["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()
    assert notice.deadline == due - 5.0
    assert p.observe(aws.poll(), time.time()) == []  # the same notice: no second decision
    control(aws_sim, "DELETE", "/simulate/eviction")  # a stopped instance started again: the notice goes
    [withdrawn] = p.observe(aws.poll(), time.time())
    assert isinstance(withdrawn, NoticeWithdrawn) and withdrawn.event_id == notice.event_id


def test_aws_token_is_renewed_before_the_granted_lifetime_ends(aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/token", {"max_ttl_s": 2})
    aws.poll()
    time.sleep(1.9)  # renewed a fifth early: at 1.6 s
    aws.poll()
    state = control(aws_sim, "GET", "/simulate/state")
    assert [r["granted"] for r in state["token_requests"]] == [2, 2]
    assert all(r["ttl_asked"] == "21600" for r in state["token_requests"])
    assert state["unauthorised"] == 0, "a token was sent after it expired"


def test_aws_token_is_renewed_after_a_401(aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    aws.poll()
    control(aws_sim, "POST", "/simulate/token", {"expire": True})  # stale before its time
    control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 120})
    assert [e.event_type for e in aws.poll().events] == ["Preempt"]
    state = control(aws_sim, "GET", "/simulate/state")
    assert len(state["token_requests"]) == 2 and state["unauthorised"] == 1


def test_aws_imdsv1_only_is_polled_without_a_token(aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/faults", {"mode": "imdsv1"})
    control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 120})
    assert [e.event_type for e in aws.poll().events] == ["Preempt"]
    aws.poll()
    assert len(control(aws_sim, "GET", "/simulate/state")["token_requests"]) == 1  # not asked again at once


def test_aws_token_endpoint_down_is_a_failed_poll_then_recovers(aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/faults", {"mode": "token-down", "count": 2})
    control(aws_sim, "POST", "/simulate/eviction", {"delay_s": 120})
    with pytest.raises(ImdsError, match="401.*no session token.*503"):
        aws.poll()
    assert [e.event_type for e in aws.poll().events] == ["Preempt"]


def test_aws_rebalance_drains_only_when_asked(aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/rebalance")
    with AwsInstanceMetadata(aws_sim.url, 1.0, INSTANCE_ID) as ignoring:
        assert ignoring.poll().events == ()
    with AwsInstanceMetadata(aws_sim.url, 1.0, INSTANCE_ID, on_rebalance="drain", unannounced_notice_s=25.0) as draining:
        p = policy(INSTANCE_ID, safety_margin_s=5.0)
        now = time.time()
        [notice] = p.observe(draining.poll(), now)
        assert isinstance(notice, EvictionNotice) and "rebalance" in notice.event.description
        assert now + 19 < notice.deadline < now + 21  # the SIGTERM drain timeout (25 − the 5 s margin)


def test_aws_lifecycle_terminated_drains_and_in_service_does_not(aws: AwsInstanceMetadata, aws_sim: MetadataServer) -> None:
    control(aws_sim, "POST", "/simulate/lifecycle", {"state": "InService"})
    assert aws.poll().events == ()
    control(aws_sim, "POST", "/simulate/lifecycle", {"state": "Terminated"})
    [event] = aws.poll().events
    assert event.event_type == "Terminate" and "scale-in" in event.description


def test_aws_instance_facts(aws: AwsInstanceMetadata) -> None:
    info = aws.instance_info()
    assert (info.name, info.vm_size, info.location, info.is_spot) == (INSTANCE_ID, "m5.large", "us-east-1", True)


# -- GCP -----------------------------------------------------------------------------------------


def test_gcp_preemption_arrives_through_the_watch_at_once(gcp: GcpMetadata, gcp_sim: MetadataServer) -> None:
    assert gcp.poll().events == () and gcp.watching
    control(gcp_sim, "POST", "/simulate/eviction", {"after_s": 0.5})
    began = time.time()
    document = gcp.poll()
    seen = time.time()
    assert [e.event_type for e in document.events] == ["Preempt"]
    assert seen - began < 1.5, "not answered by the watch"
    not_before = document.events[0].not_before
    assert not_before is not None and abs(not_before.timestamp() - (seen + 30)) < 0.5
    assert control(gcp_sim, "GET", "/simulate/state")["watches"] >= 1


def test_gcp_maintenance_terminate_drains_and_migrate_does_not(gcp: GcpMetadata, gcp_sim: MetadataServer) -> None:
    control(gcp_sim, "POST", "/simulate/maintenance", {"value": "MIGRATE_ON_HOST_MAINTENANCE"})
    assert gcp.poll().events == ()
    control(gcp_sim, "POST", "/simulate/maintenance", {"value": "TERMINATE_ON_HOST_MAINTENANCE"})
    [event] = gcp.poll().events
    assert event.event_type == "Terminate" and event.not_before is not None
    assert event.not_before.timestamp() < time.time() + 60


def test_gcp_503_is_a_failed_poll_never_a_notice(gcp: GcpMetadata, gcp_sim: MetadataServer) -> None:
    gcp.poll()
    control(gcp_sim, "POST", "/simulate/faults", {"mode": "503", "count": 2})
    with pytest.raises(ImdsError, match="503"):
        gcp.poll()
    assert gcp.watching, "a 503 is no reason to stop watching"


def test_gcp_hanging_watch_falls_back_to_polling(gcp_sim: MetadataServer) -> None:
    with GcpMetadata(gcp_sim.url, 0.5, "spot-render-07", watch_timeout_s=1) as gcp:
        gcp.poll()
        control(gcp_sim, "POST", "/simulate/faults", {"mode": "hang", "count": 100})
        with pytest.raises(ImdsError, match="timed out"):
            gcp.poll()
        assert not gcp.watching and gcp.next_poll_in(1.0) == 1.0
        control(gcp_sim, "POST", "/simulate/eviction")
        assert [e.event_type for e in gcp.poll().events] == ["Preempt"]


def test_gcp_instance_facts(gcp: GcpMetadata) -> None:
    info = gcp.instance_info()
    assert (info.name, info.vm_size, info.location, info.is_spot) == ("spot-render-07", "n2-standard-4", "us-central1-a", True)


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_cli_simulates_each_cloud_in_the_foreground(cloud: str) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "simulate", "--cloud", cloud, "--port", str(port),
                             "--evict-after", "0"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=10)
        url = f"http://127.0.0.1:{port}"
        source = AwsInstanceMetadata(url, 2.0) if cloud == "aws" else GcpMetadata(url, 2.0)
        with source:
            assert source.instance_info().name == ("i-0abc1234def567890" if cloud == "aws" else "spot-render-07")
            [event] = source.poll().events
            assert event.event_type == "Preempt"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"SPOT_EVENTS_SOURCE={cloud} SPOT_EVENTS_ENDPOINT={url}" in out
