"""The local IMDS simulator, over real HTTP."""

from __future__ import annotations

import email.utils
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from supervisor.simulator.server import ImdsSimulator
from supervisor.vm.imds import ImdsError, InstanceInfo, fetch_instance_info, parse_instance
from testsupport.harness import AZURE_FIXTURES, REPO
from testsupport.net import free_port, wait_for_port
from testsupport.waiting import wait_until

EVENTS = "/metadata/scheduledevents?api-version=2020-07-01"
INSTANCE = "/metadata/instance?api-version=2021-02-01"
MD = {"Metadata": "true"}


FIXTURES = AZURE_FIXTURES


@pytest.fixture
def sim() -> Iterator[ImdsSimulator]:
    with ImdsSimulator() as simulator:
        yield simulator


@pytest.fixture
def http(sim: ImdsSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.url, trust_env=False, timeout=5) as client:
        yield client


def events(http: httpx.Client) -> dict:
    response = http.get(EVENTS, headers=MD)
    assert response.status_code == 200, response.text
    return response.json()


# -- instance metadata ---------------------------------------------------------

def test_instance_metadata_has_the_azure_shape(sim: ImdsSimulator, http: httpx.Client) -> None:
    served = http.get(INSTANCE, headers=MD).json()
    fixture = json.loads((FIXTURES / "instance-spot.json").read_text())
    assert set(served) == set(fixture)
    for key in ("name", "vmSize", "location", "priority", "evictionPolicy", "resourceId", "vmScaleSetName"):
        assert key in served["compute"]
    assert served["compute"]["name"] == "vm-spot-07"
    assert served["compute"]["resourceId"].endswith("/providers/Microsoft.Compute/virtualMachines/vm-spot-07")

    info = fetch_instance_info(sim.url, timeout_s=2)
    assert info == InstanceInfo(name="vm-spot-07", vm_size="Standard_D2s_v3", priority="Spot",
                                eviction_policy="Deallocate", resource_id=served["compute"]["resourceId"],
                                location="eastus2", vm_scale_set_name="")
    assert info.is_spot


def test_instance_metadata_from_constructor_args() -> None:
    with ImdsSimulator(vm_name="vm-big", vm_size="Standard_F16s_v2", priority="Regular", location="westeurope") as s:
        info = fetch_instance_info(s.url + "/", timeout_s=2)
    assert (info.name, info.vm_size, info.priority, info.eviction_policy, info.location) == (
        "vm-big", "Standard_F16s_v2", "Regular", "", "westeurope")
    assert not info.is_spot


@pytest.mark.parametrize("name", ["instance-spot.json", "instance-regular.json"])
def test_parse_instance_fixtures(name: str) -> None:
    raw = (FIXTURES / name).read_text()
    compute = json.loads(raw)["compute"]
    info = parse_instance(raw)
    assert (info.name, info.vm_size, info.priority, info.eviction_policy) == (
        compute["name"], compute["vmSize"], compute["priority"], compute["evictionPolicy"])


@pytest.mark.parametrize("raw", ["", "nope", "[]", '{"compute": 1}', '{"compute": {"vmSize": "x"}}',
                                 '{"compute": {"name": "vm", "vmSize": 3}}'])
def test_parse_instance_rejects_bad_shapes(raw: str) -> None:
    with pytest.raises(ImdsError):
        parse_instance(raw)


def test_fetch_instance_info_errors_are_imds_errors(sim: ImdsSimulator) -> None:
    with pytest.raises(ImdsError, match="HTTP 404"):
        fetch_instance_info(sim.url + "/elsewhere", timeout_s=2)
    with pytest.raises(ImdsError) as excinfo:
        fetch_instance_info(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    assert "\n" not in str(excinfo.value)


# -- the Azure contract ----------------------------------------------------------

@pytest.mark.parametrize("method,path", [("GET", EVENTS), ("POST", EVENTS), ("GET", INSTANCE)])
@pytest.mark.parametrize("headers", [{}, {"Metadata": "false"}])
def test_requests_without_metadata_header_get_400(http: httpx.Client, method: str, path: str,
                                                  headers: dict) -> None:
    response = http.request(method, path, headers=headers, content=b'{"StartRequests": []}')
    assert response.status_code == 400
    assert "metadata header" in response.json()["error"]


@pytest.mark.parametrize("path", ["/metadata/scheduledevents", "/metadata/instance"])
def test_missing_api_version_gets_400(http: httpx.Client, path: str) -> None:
    response = http.get(path, headers=MD)
    assert response.status_code == 400
    assert "api-version" in response.json()["error"]


def test_empty_document_at_start(http: httpx.Client) -> None:
    assert events(http) == {"DocumentIncarnation": 1, "Events": []}


def test_simulate_eviction_serves_a_preempt_in_the_documented_shape(sim: ImdsSimulator, http: httpx.Client) -> None:
    before = time.time()
    created = http.post("/simulate/eviction", json={"delay_s": 30}).json()
    doc = events(http)
    assert doc["DocumentIncarnation"] == created["DocumentIncarnation"] == 2
    (event,) = doc["Events"]
    fixture_event = json.loads((FIXTURES / "scheduledevents-preempt.json").read_text())["Events"][0]
    assert list(event) == list(fixture_event)  # same keys, same order as Azure's
    assert event["EventId"] == created["EventId"]
    assert (event["EventType"], event["EventStatus"], event["Resources"]) == ("Preempt", "Scheduled", ["vm-spot-07"])
    assert (event["EventSource"], event["DurationInSeconds"], event["ResourceType"]) == ("Platform", -1,
                                                                                       "VirtualMachine")
    assert event["NotBefore"].endswith(" GMT")
    not_before = email.utils.parsedate_to_datetime(event["NotBefore"]).timestamp()
    assert before + 28 <= not_before <= before + 31


def test_simulate_eviction_defaults_and_resources(http: httpx.Client) -> None:
    created = http.post("/simulate/eviction").json()
    shared = http.post("/simulate/eviction", json={"resources": ["vm-spot-07", "other-vm"], "delay_s": 5}).json()
    by_id = {e["EventId"]: e for e in events(http)["Events"]}
    assert by_id[created["EventId"]]["Resources"] == ["vm-spot-07"]
    assert by_id[shared["EventId"]]["Resources"] == ["vm-spot-07", "other-vm"]


def test_any_event_type(http: httpx.Client) -> None:
    created = http.post("/simulate/event", json={
        "type": "Freeze", "delay_s": 60, "resources": ["other-vm"], "source": "Platform", "duration_s": 5,
        "description": "Host server is undergoing maintenance."}).json()
    (event,) = events(http)["Events"]
    assert event["EventId"] == created["EventId"]
    assert (event["EventType"], event["Resources"], event["DurationInSeconds"], event["Description"]) == (
        "Freeze", ["other-vm"], 5, "Host server is undergoing maintenance.")
    started = http.post("/simulate/event", json={"type": "Reboot", "status": "Started", "source": "User"}).json()
    event = next(e for e in events(http)["Events"] if e["EventId"] == started["EventId"])
    assert (event["EventStatus"], event["NotBefore"], event["EventSource"]) == ("Started", "", "User")


def test_events_start_at_not_before_then_complete(http: httpx.Client) -> None:
    created = http.post("/simulate/event", json={"type": "Freeze", "delay_s": 0.3, "duration_s": 5,
                                                 "complete_after_s": 0.3}).json()
    first = events(http)
    assert first["Events"][0]["EventStatus"] == "Scheduled"
    started = wait_until(lambda: (d := events(http))["Events"] and d["Events"][0]["EventStatus"] == "Started" and d, 3.0)
    assert started["Events"][0]["NotBefore"] == ""
    assert started["Events"][0]["EventId"] == created["EventId"]
    assert started["DocumentIncarnation"] != first["DocumentIncarnation"]
    gone = wait_until(lambda: not (d := events(http))["Events"] and d, 3.0)
    assert gone["DocumentIncarnation"] not in (first["DocumentIncarnation"], started["DocumentIncarnation"])


def test_eviction_can_appear_later(sim: ImdsSimulator, http: httpx.Client) -> None:
    created = sim.simulate_eviction(delay_s=5, after_s=0.3)
    assert events(http)["Events"] == []
    doc = wait_until(lambda: (d := events(http))["Events"] and d, 2.0)
    assert doc["Events"][0]["EventId"] == created["EventId"]


def test_incarnation_changes_on_every_events_change(sim: ImdsSimulator, http: httpx.Client) -> None:
    seen = [events(http)["DocumentIncarnation"]]

    def changed() -> dict:
        doc = events(http)
        assert doc["DocumentIncarnation"] != seen[-1], doc
        seen.append(doc["DocumentIncarnation"])
        again = events(http)  # nothing changed: same incarnation
        assert again == doc
        return doc

    first = http.post("/simulate/eviction", json={"delay_s": 30}).json()["EventId"]
    changed()
    second = http.post("/simulate/event", json={"type": "Freeze", "delay_s": 30}).json()["EventId"]
    changed()
    http.post(EVENTS, headers=MD, json={"StartRequests": [{"EventId": first}]})
    doc = changed()
    assert next(e for e in doc["Events"] if e["EventId"] == first)["EventStatus"] == "Started"
    http.post(EVENTS, headers=MD, json={"StartRequests": [{"EventId": first}]})  # already Started: no change
    assert events(http)["DocumentIncarnation"] == seen[-1]
    assert http.delete(f"/simulate/event/{second}").status_code == 200
    changed()
    http.post("/simulate/document", content=(FIXTURES / "scheduledevents-mixed.json").read_bytes())
    assert changed()["DocumentIncarnation"] == 11
    http.delete("/simulate/event/11111111-AAAA-4BBB-8CCC-DDDDDDDDDDDD")
    changed()
    http.post("/simulate/reset")
    assert changed()["Events"] == []
    assert len(set(seen[-2:])) == 2


def test_ack_is_recorded_and_starts_the_event(sim: ImdsSimulator, http: httpx.Client) -> None:
    event_id = http.post("/simulate/eviction", json={"delay_s": 30}).json()["EventId"]
    body = json.dumps({"StartRequests": [{"EventId": event_id}]})
    before = time.time()
    response = http.post(EVENTS, headers={**MD, "Content-Type": "application/json"}, content=body)
    assert response.status_code == 200
    (ack,) = http.get("/simulate/acks").json()
    assert ack["body"] == {"StartRequests": [{"EventId": event_id}]}
    assert ack["raw"] == body
    assert ack["headers"]["Metadata"] == "true"
    assert before <= ack["time"] <= time.time()
    (event,) = events(http)["Events"]
    assert (event["EventStatus"], event["NotBefore"]) == ("Started", "")


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"StartRequests": [{"Id": "x"}]}'])
def test_ack_with_a_bad_body_gets_400(http: httpx.Client, body: bytes) -> None:
    assert http.post(EVENTS, headers=MD, content=body).status_code == 400


def test_cancel_event(http: httpx.Client) -> None:
    event_id = http.post("/simulate/eviction", json={"delay_s": 30}).json()["EventId"]
    response = http.delete(f"/simulate/event/{event_id}")
    assert response.status_code == 200 and response.json()["EventId"] == event_id
    assert events(http)["Events"] == []
    assert http.delete(f"/simulate/event/{event_id}").status_code == 404


@pytest.mark.parametrize("path", sorted(p.name for p in FIXTURES.glob("scheduledevents-*.json")))
def test_documents_are_served_verbatim(http: httpx.Client, path: str) -> None:
    fixture = json.loads((FIXTURES / path).read_text())
    assert http.post("/simulate/document", json=fixture).status_code == 200
    assert events(http) == fixture
    assert events(http) == fixture  # no clock applies to loaded documents, even with NotBefore in the past


def test_a_loaded_document_still_reacts_to_acks(http: httpx.Client) -> None:
    http.post("/simulate/document", content=(FIXTURES / "scheduledevents-preempt.json").read_bytes())
    http.post(EVENTS, headers=MD, json={"StartRequests": [{"EventId": "A123BC45-1234-5678-AB90-ABCDEF123456"}]})
    started = json.loads((FIXTURES / "scheduledevents-preempt-started.json").read_text())["Events"]
    assert events(http)["Events"] == started


def test_malformed_document_is_served_as_given_until_the_next_change(http: httpx.Client) -> None:
    http.post("/simulate/document", json={"DocumentIncarnation": "7", "Events": {}})
    assert events(http) == {"DocumentIncarnation": "7", "Events": {}}
    http.post("/simulate/eviction")
    doc = events(http)
    assert isinstance(doc["DocumentIncarnation"], int) and len(doc["Events"]) == 1


@pytest.mark.parametrize("mode,status", [("500", 500), ("410", 410), ("429", 429)])
def test_status_faults_apply_to_the_next_n_gets(http: httpx.Client, mode: str, status: int) -> None:
    http.post("/simulate/faults", json={"mode": mode, "count": 2, "retry_after_s": 3})
    for _ in range(2):
        response = http.get(EVENTS, headers=MD)
        assert response.status_code == status
        assert response.headers["Retry-After"] == "3"
    assert http.get(INSTANCE, headers=MD).status_code == 200  # instance metadata is not affected
    assert http.get(EVENTS, headers=MD).status_code == 200


def test_garbage_fault(http: httpx.Client) -> None:
    http.post("/simulate/faults", json={"mode": "garbage", "count": 1})
    response = http.get(EVENTS, headers=MD)
    assert response.status_code == 200
    with pytest.raises(ValueError):
        json.loads(response.content)
    assert events(http)["DocumentIncarnation"] == 1


def test_reset_fault(http: httpx.Client) -> None:
    http.post("/simulate/faults", json={"mode": "reset", "count": 1})
    with pytest.raises(httpx.TransportError):
        http.get(EVENTS, headers=MD)
    assert events(http)["Events"] == []


def test_slow_fault(http: httpx.Client) -> None:
    http.post("/simulate/faults", json={"mode": "slow", "count": 1, "delay_s": 0.4})
    started = time.monotonic()
    assert events(http)["Events"] == []
    assert time.monotonic() - started >= 0.4
    started = time.monotonic()
    events(http)
    assert time.monotonic() - started < 0.3


def test_bad_control_requests(http: httpx.Client) -> None:
    assert http.post("/simulate/faults", json={"mode": "teapot"}).status_code == 400
    assert http.post("/simulate/faults", json={"mode": "500", "count": -1}).status_code == 400
    assert http.post("/simulate/event", json={"delay_s": 3}).status_code == 400
    assert http.post("/simulate/eviction", json={"delay_s": "soon"}).status_code == 400
    assert http.post("/simulate/eviction", content=b"{").status_code == 400
    assert http.post("/simulate/nothing").status_code == 404


def test_request_counts_and_reset(sim: ImdsSimulator, http: httpx.Client) -> None:
    events(http)
    events(http)
    http.get(INSTANCE, headers=MD)
    event_id = http.post("/simulate/eviction").json()["EventId"]
    http.post(EVENTS, headers=MD, json={"StartRequests": [{"EventId": event_id}]})
    http.post("/simulate/faults", json={"mode": "500", "count": 5})
    counts = http.get("/simulate/requests").json()
    assert counts["GET /metadata/scheduledevents"] == 2
    assert counts["GET /metadata/instance"] == 1
    assert counts["POST /metadata/scheduledevents"] == 1
    assert counts["POST /simulate/eviction"] == 1

    assert http.get(EVENTS, headers=MD).status_code == 500
    http.post("/simulate/reset")
    assert http.get("/simulate/acks").json() == []
    doc = events(http)  # faults cleared too
    assert doc["Events"] == []
    assert http.get("/simulate/requests").json() == {"GET /simulate/acks": 1,
                                                     "GET /metadata/scheduledevents": 1, "GET /simulate/requests": 1}


def test_stop_closes_kept_alive_connections() -> None:
    sim = ImdsSimulator().start()
    client = httpx.Client(base_url=sim.url, trust_env=False, timeout=1)
    assert client.get(EVENTS, headers=MD).status_code == 200
    sim.stop()
    with pytest.raises(httpx.TransportError):
        client.get(EVENTS, headers=MD)
    client.close()


def test_cli_serves_in_the_foreground_until_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "supervisor", "simulate", "--port", str(port), "--vm-name", "vm-cli",
                             "--evict-after", "0", "--notice", "7"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_port(port, timeout=10)
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, trust_env=False, timeout=2) as http:
            doc = wait_until(lambda: (d := events(http))["Events"] and d, 3.0)
            (event,) = doc["Events"]
            assert (event["EventType"], event["Resources"]) == ("Preempt", ["vm-cli"])
            assert http.get(INSTANCE, headers=MD).json()["compute"]["name"] == "vm-cli"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert url in out
    assert "eviction" in err and "scheduled" in err
