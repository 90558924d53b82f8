"""The lean per-message queue path (worker.queue.lean over worker.queue.transport) against the real Azurite:
each credential kind (Shared Key, SAS, a managed-identity token), the error meanings the worker acts on
(403 backoff, 503 retried, lost lease), and requests signed as the SDK signs them (Azurite checks).
The proxy from the environment: tests/delivery/test_queue_client.py (both clients); hostile answers: tests/attack/."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from azure.core.exceptions import ClientAuthenticationError, ServiceRequestError
from azure.identity import ManagedIdentityCredential
from azure.storage.queue import QueueClient, QueueSasPermissions, generate_queue_sas

from testsupport.azurite import ACCOUNT, ACCOUNT_KEY, Azurite, connection_string
from testsupport.harness import worker_settings
from testsupport.oauth import IDENTITY_HEADER, TokenEndpoint, running_oauth_azurite
from testsupport.proxy import FaultProxy
from worker.message import Codec, Envelope
from worker.queue.client import is_auth_error, is_lease_lost, message_client
from worker.queue.lean import LeanQueueClient
from worker.queue.lease import Lease, LeaseState
from worker.queue.transport import BearerToken, QueueHttp
from worker.settings import QueueSettings


def lean(settings: QueueSettings) -> LeanQueueClient:
    client = message_client(settings)
    assert isinstance(client, LeanQueueClient)
    return client


def round_trip(client: LeanQueueClient, text: str = 'a <body> & "quotes" – ünïcode') -> None:
    """Put, Get, Update (a checkpoint: new text, new receipt), Get again after it, Delete: every per-message call."""
    sent = client.send_message(text)
    assert sent.id and sent.pop_receipt and sent.inserted_on is not None
    [received] = next(client.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=30).by_page())
    assert (received.id, received.content, received.dequeue_count) == (sent.id, text, 1)
    assert received.inserted_on is not None and received.inserted_on.tzinfo is not None
    updated = client.update_message(received.id, received.pop_receipt, content=text + "!", visibility_timeout=0)
    assert updated.pop_receipt and updated.pop_receipt != received.pop_receipt
    [again] = client.receive_messages(max_messages=1, visibility_timeout=30)
    assert (again.content, again.dequeue_count) == (text + "!", 2)
    client.delete_message(again.id, again.pop_receipt)
    assert list(client.receive_messages(max_messages=32)) == []


@pytest.fixture
def settings(azurite: Azurite, queue: QueueClient, queue_name: str) -> QueueSettings:
    return worker_settings(azurite, queue_name).queue


def test_shared_key_from_the_connection_string(settings: QueueSettings) -> None:
    round_trip(lean(settings))


def test_everything_else_goes_to_the_sdk_client(settings: QueueSettings) -> None:
    client = lean(settings)
    client.send_message("one")
    assert client.get_queue_properties().approximate_message_count == 1  # not a lean call: the SDK's
    assert [m.content for m in client.peek_messages()] == ["one"]


def test_sas_from_the_connection_string(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    every = QueueSasPermissions(read=True, add=True, update=True, process=True)
    sas = generate_queue_sas(ACCOUNT, queue_name, ACCOUNT_KEY, permission=every,
                             expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    sas_only = f"QueueEndpoint=http://127.0.0.1:{azurite.port}/{ACCOUNT};SharedAccessSignature={sas}"
    client = lean(replace(worker_settings(azurite, queue_name).queue, connection_string=sas_only))
    round_trip(client)


def test_a_sas_without_the_permission_is_refused_as_an_auth_error(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    sas = generate_queue_sas(ACCOUNT, queue_name, ACCOUNT_KEY, permission=QueueSasPermissions(read=True),
                             expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    client = lean(replace(worker_settings(azurite, queue_name).queue,
                          connection_string=f"QueueEndpoint=http://127.0.0.1:{azurite.port}/{ACCOUNT};SharedAccessSignature={sas}"))
    with pytest.raises(ClientAuthenticationError) as refused:
        client.send_message("not allowed")
    assert refused.value.status_code == 403 and is_auth_error(refused.value)


def test_a_wrong_key_is_a_403_auth_error_not_retried(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    wrong = connection_string(azurite.port).replace(ACCOUNT_KEY, "d3Jvbmcga2V5IG9mIHRoZSByaWdodCBsZW5ndGgh" * 2)
    with FaultProxy(azurite.port) as proxy:
        wrong = wrong.replace(f":{azurite.port}/", f":{proxy.port}/")
        client = lean(replace(worker_settings(azurite, queue_name).queue, connection_string=wrong))
        with pytest.raises(ClientAuthenticationError) as refused:
            next(client.receive_messages(messages_per_page=32, max_messages=32).by_page())
        assert refused.value.status_code == 403 and is_auth_error(refused.value)
        assert refused.value.error_code  # Azurite's code, kept as the SDK keeps it
        assert proxy.stats.requests == 1  # a 403 goes back to the caller (who backs off), never retried here


def test_a_503_from_the_proxy_is_retried_then_the_call_succeeds(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    queue.send_message("after the outage")
    with FaultProxy(azurite.port) as proxy:
        client = lean(replace(worker_settings(azurite, queue_name).queue, connection_string=connection_string(proxy.port)))
        proxy.set_fault("http503")
        started = time.monotonic()
        # The proxy answers 503 until it is told to pass; the call keeps retrying meanwhile (the SDK's schedule).
        threading.Timer(1.0, proxy.set_fault, args=("pass",)).start()
        [message] = next(client.receive_messages(messages_per_page=32, max_messages=32, visibility_timeout=30).by_page())
        assert message.content == "after the outage"
        assert proxy.stats.faults["http503"] >= 1 and time.monotonic() - started >= 1.0


def test_a_503_on_every_try_ends_as_the_service_error(azurite: Azurite, queue: QueueClient, queue_name: str) -> None:
    with FaultProxy(azurite.port, mode="http503") as proxy:
        client = lean(replace(worker_settings(azurite, queue_name).queue, connection_string=connection_string(proxy.port)))
        with pytest.raises(Exception) as failed:
            client.update_message("some-id", "receipt", visibility_timeout=5, retry_total=1, connection_timeout=2, read_timeout=2)
        assert getattr(failed.value, "status_code", None) == 503 and getattr(failed.value, "error_code", None) == "ServerBusy"
        assert proxy.stats.faults["http503"] == 2  # retry_total=1: the first try and one retry


def test_a_lost_lease_is_seen_as_lost(settings: QueueSettings, queue: QueueClient) -> None:
    client = lean(settings)
    client.send_message(json.dumps({"n": 1}))
    [mine] = client.receive_messages(max_messages=1, visibility_timeout=1)
    time.sleep(1.5)
    [theirs] = queue.receive_messages(max_messages=1, visibility_timeout=30)  # another consumer, another receipt
    assert theirs.id == mine.id
    with pytest.raises(Exception) as lost:
        client.delete_message(mine.id, mine.pop_receipt)
    assert is_lease_lost(lost.value)
    lease = Lease(client, Codec("none"), mine.id, mine.pop_receipt or "", Envelope(mine.content or ""), 30)  # type: ignore[arg-type]
    assert lease.renew() is False and lease.state is LeaseState.DONE  # the worker's reading: lost, given up quietly
    queue.delete_message(theirs)


def test_a_deleted_message_is_a_lost_lease_too(settings: QueueSettings) -> None:
    client = lean(settings)
    client.send_message("x")
    [message] = client.receive_messages(max_messages=1, visibility_timeout=30)
    client.delete_message(message.id, message.pop_receipt)
    with pytest.raises(Exception) as gone:
        client.update_message(message.id, message.pop_receipt, visibility_timeout=0)
    assert is_lease_lost(gone.value) and getattr(gone.value, "status_code", None) == 404


def test_a_managed_identity_token_from_the_token_endpoint_refreshed_before_expiry(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ManagedIdentityCredential (what [queue] account_url uses) against a token endpoint, on Azurite over HTTPS
    with --oauth basic, trusted through REQUESTS_CA_BUNDLE. Tokens live 301 s: inside the 5-minute refresh margin
    from the start, so each call after a second asks for a new one."""
    for name in ("MSI_ENDPOINT", "MSI_SECRET", "IMDS_ENDPOINT", "IDENTITY_SERVER_THUMBPRINT", "AZURE_CLIENT_ID",
                 "AZURE_POD_IDENTITY_AUTHORITY_HOST", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    with TokenEndpoint(lifetime_s=301) as endpoint, running_oauth_azurite(tmp_path) as azurite:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(azurite.ca_bundle))
        client = lean(QueueSettings(account_url=azurite.account_url, name="tokenqueue"))
        assert isinstance(client.http.signer, BearerToken)
        client.create_queue()  # the SDK's call, the same credential
        round_trip(client)
        issued = endpoint.issued
        time.sleep(1.5)
        client.send_message("after a refresh")
        assert endpoint.issued > issued


def test_a_token_never_travels_over_plain_http(azurite: Azurite, queue_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK refuses the pair at construction; the lean transport refuses it too, before asking for a token."""
    with TokenEndpoint() as endpoint:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", IDENTITY_HEADER)
        credential = ManagedIdentityCredential()
        transport = QueueHttp(f"http://127.0.0.1:{azurite.port}/{ACCOUNT}/{queue_name}", BearerToken(credential), "2021-02-12", 2, 2)
        with pytest.raises(ServiceRequestError, match="non-TLS"):
            transport.request("GET", "/messages")
        assert endpoint.issued == 0
