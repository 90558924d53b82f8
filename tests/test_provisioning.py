"""The provisioning gate against a fake ARM and a fake IMDS token endpoint, over real HTTP.

The token comes from azure-identity's real ManagedIdentityCredential: both
azure-identity and MSAL read AZURE_POD_IDENTITY_AUTHORITY_HOST to find the IMDS
host, so the fake serves /metadata/identity/oauth2/token in the IMDS shape.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from supervisor.simulator.server import ImdsSimulator
from supervisor.vm.provisioning import (
    ARM_API_VERSION,
    ProvisioningTimeout,
    resource_url,
    wait_for_provisioning,
)
from testsupport.azurite import Azurite
from testsupport.harness import child_env
from worker.common.backoff import Backoff, exponential_delay

VM_ID = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/spot-1"
VMSS_VM_ID = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/pool/virtualMachines/3"
TOKEN = "fake-arm-token"
FAST = {"initial_delay_s": 0.02, "max_delay_s": 0.1, "request_timeout_s": 2.0}


@dataclass
class FakeAzure:
    """ARM answers `states` in turn (the last one forever); entries may be (status, body)."""

    url: str = ""
    states: list[object] = field(default_factory=list)
    arm_requests: list[dict[str, object]] = field(default_factory=list)
    token_requests: list[dict[str, object]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_answer(self) -> object:
        with self.lock:
            return self.states.pop(0) if len(self.states) > 1 else self.states[0]


def _handler(fake: FakeAzure) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            parts = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            if parts.path == "/metadata/identity/oauth2/token":
                fake.token_requests.append({"query": query, "metadata": self.headers.get("Metadata")})
                if self.headers.get("Metadata") != "true":
                    self.send_json(400, {"error": "invalid_request", "error_description": "Required metadata header not specified"})
                    return
                now = int(time.time())
                self.send_json(200, {
                    "access_token": TOKEN, "client_id": query.get("client_id", "system-assigned"),
                    "expires_in": "3599", "expires_on": str(now + 3599), "ext_expires_in": "3599",
                    "not_before": str(now), "resource": query.get("resource", ""), "token_type": "Bearer",
                })
                return
            if parts.path.startswith("/subscriptions/"):
                fake.arm_requests.append({"path": parts.path, "query": query, "auth": self.headers.get("Authorization")})
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    self.send_json(401, {"error": {"code": "InvalidAuthenticationToken", "message": "bad token"}})
                    return
                answer = fake.next_answer()
                if isinstance(answer, tuple):
                    status, body, *rest = answer
                    self.send_json(status, body, rest[0] if rest else None)
                    return
                self.send_json(200, {"id": parts.path, "name": parts.path.rsplit("/", 1)[-1],
                                     "properties": {"provisioningState": answer}})
                return
            self.send_json(404, {"error": {"code": "NotFound", "message": self.path}})

    return Handler


@pytest.fixture
def fake_azure(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAzure]:
    fake = FakeAzure(states=["Succeeded"])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", fake.url)
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT",
                 "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def test_waits_while_creating_and_returns_once_succeeded(fake_azure: FakeAzure) -> None:
    fake_azure.states = ["Creating", "Creating", "Updating", "Succeeded"]
    started = time.monotonic()
    wait_for_provisioning(VMSS_VM_ID, fake_azure.url, timeout_s=10, **FAST)
    assert time.monotonic() - started < 5
    assert len(fake_azure.arm_requests) == 4
    first = fake_azure.arm_requests[0]
    assert first["path"] == VMSS_VM_ID
    assert first["query"] == {"api-version": "2024-07-01"} and ARM_API_VERSION == "2024-07-01"
    assert first["auth"] == f"Bearer {TOKEN}"
    token = fake_azure.token_requests[0]
    assert token["metadata"] == "true"
    assert token["query"]["resource"] == "https://management.azure.com"
    assert "client_id" not in token["query"]


def test_gives_up_with_provisioning_timeout(fake_azure: FakeAzure) -> None:
    fake_azure.states = ["Creating"]
    started = time.monotonic()
    with pytest.raises(ProvisioningTimeout) as caught:
        wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=0.6, **FAST)
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 2.5
    message = str(caught.value)
    assert "\n" not in message
    assert VM_ID in message and "'Creating'" in message and "0.6s" in message
    assert caught.value.last_state == "Creating"
    assert len(fake_azure.arm_requests) >= 3  # it kept polling until the end


def test_failed_is_not_final_the_gate_keeps_waiting(fake_azure: FakeAzure) -> None:
    fake_azure.states = ["Failed", "Failed", "Succeeded"]
    wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=10, **FAST)
    assert len(fake_azure.arm_requests) == 3


def test_arm_errors_are_retried_and_the_last_one_is_reported(fake_azure: FakeAzure) -> None:
    forbidden = (403, {"error": {"code": "AuthorizationFailed", "message": "no read\naccess yet"}})
    fake_azure.states = [forbidden, (500, {}), (429, {}, {"Retry-After": "0"}), (200, {"unexpected": True}), "Succeeded"]
    wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=10, **FAST)
    assert len(fake_azure.arm_requests) == 5

    fake_azure.states = [forbidden]
    with pytest.raises(ProvisioningTimeout) as caught:
        wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=0.3, **FAST)
    message = str(caught.value)
    assert "no state seen" in message and "HTTP 403 AuthorizationFailed: no read access yet" in message
    assert "\n" not in message


def test_user_assigned_identity_asks_imds_for_its_client_id(fake_azure: FakeAzure) -> None:
    wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=10, client_id="1111-2222", **FAST)
    assert fake_azure.token_requests[-1]["query"]["client_id"] == "1111-2222"


def test_any_token_credential_can_be_passed(fake_azure: FakeAzure, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", "http://127.0.0.1:9")  # must not be used

    class Static:
        scopes: list[str] = []

        def get_token(self, *scopes: str, **kwargs: object) -> object:
            self.scopes.extend(scopes)
            return type("Token", (), {"token": TOKEN, "expires_on": int(time.time()) + 600})()

    credential = Static()
    fake_azure.states = ["Creating", "Succeeded"]
    wait_for_provisioning(VM_ID, fake_azure.url + "/", timeout_s=10, credential=credential, **FAST)
    assert credential.scopes == ["https://management.azure.com/.default"] * 2
    assert fake_azure.token_requests == []
    assert fake_azure.arm_requests[0]["path"] == VM_ID  # no double slash from the trailing one


def test_an_unreachable_token_endpoint_ends_in_a_timeout_naming_it(fake_azure: FakeAzure) -> None:
    class Broken:
        def get_token(self, *scopes: str, **kwargs: object) -> object:
            raise RuntimeError("ManagedIdentityCredential authentication unavailable")

    with pytest.raises(ProvisioningTimeout, match="no token for https://management.azure.com/.default"):
        wait_for_provisioning(VM_ID, fake_azure.url, timeout_s=0.2, credential=Broken(), **FAST)
    assert fake_azure.arm_requests == []


def test_arguments_that_can_never_work_are_rejected_at_once() -> None:
    with pytest.raises(ValueError, match="/subscriptions/"):
        resource_url("https://management.azure.com", "spot-1")
    with pytest.raises(ValueError, match="http"):
        resource_url("management.azure.com", VM_ID)
    with pytest.raises(ValueError, match="timeout_s"):
        wait_for_provisioning(VM_ID, "https://management.azure.com", 0, credential=object())


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    assert exponential_delay(0, 1.0, 30.0) == 1.0
    assert exponential_delay(3, 1.0, 30.0) == 8.0
    assert exponential_delay(10, 1.0, 30.0) == 30.0
    backoff = Backoff(1.0, 30.0, jitter="equal")  # the gate's: never sooner than half the grown delay
    delays = [backoff.next_delay() for _ in range(1000)]
    assert 0.5 <= delays[0] <= 1.0 and 4.0 <= delays[3] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])


def test_supervisor_starts_workers_only_once_arm_reports_succeeded(fake_azure: FakeAzure, azurite: Azurite,
                                                                   queue_name: str, tmp_path: Path) -> None:
    fake_azure.states = ["Creating"]
    with ImdsSimulator() as imds:
        env = child_env(azurite, queue_name=queue_name, events_source="azure", events_endpoint=imds.url,
                        startup_wait_for_provisioning="true", startup_arm_endpoint=fake_azure.url,
                        startup_provisioning_timeout_s="60", scaling_workers="1")
        log = tmp_path / "supervisor.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], env=env, stderr=fh)
            try:
                deadline = time.monotonic() + 20
                while len(fake_azure.arm_requests) < 3 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(fake_azure.arm_requests) >= 3, log.read_text()
                assert "spawned worker" not in log.read_text()
                fake_azure.states = ["Succeeded"]
                while "spawned worker" not in log.read_text() and time.monotonic() < deadline + 20:
                    time.sleep(0.05)
                assert "spawned worker" in log.read_text()
                assert fake_azure.arm_requests[-1]["path"] == (
                    "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg-vmspot"
                    "/providers/Microsoft.Compute/virtualMachines/vm-spot-07")
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()


def test_supervisor_gives_up_after_the_gate_timeout_with_one_line(fake_azure: FakeAzure, azurite: Azurite,
                                                                  queue_name: str) -> None:
    fake_azure.states = ["Creating"]
    with ImdsSimulator() as imds:
        env = child_env(azurite, queue_name=queue_name, events_source="azure", events_endpoint=imds.url,
                        startup_wait_for_provisioning="true", startup_arm_endpoint=fake_azure.url,
                        startup_provisioning_timeout_s="2")
        result = subprocess.run([sys.executable, "-m", "supervisor", "run"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Creating" in errors[0], result.stderr
    assert "spawned worker" not in result.stderr
