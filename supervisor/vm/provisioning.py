"""Provisioning gate: wait until Azure says this VM is done provisioning.

A VM Application (this package) is installed *during* provisioning, and on a
scale set the role assignments, extensions and the rest of the model are still
being applied when systemd first starts the service. With
`[startup] wait_for_provisioning = true` the supervisor asks Azure Resource
Manager for its own resource (IMDS `compute.resourceId`, a VM or a scale-set
instance such as `.../virtualMachineScaleSets/x/virtualMachines/3`) and starts
work only once `properties.provisioningState` is `Succeeded`.

Authentication is the VM's managed identity (azure-identity
`ManagedIdentityCredential`, scope `https://management.azure.com/.default`);
the identity needs read access to the resource (Reader on the VM or on the
scale set). Any `TokenCredential` may be passed instead.

Every failure while waiting (token not available yet, 403 while a role
assignment propagates, 404, 429, 5xx, timeouts, bad JSON) is retried with
capped exponential backoff and jitter until `timeout_s`; then
`ProvisioningTimeout` says, on one line, the last state or error seen.

`Failed` is not final on Azure: it is the state after any failed operation
(an extension that failed, an interrupted update), and the next successful
operation (an extension retry, `az vm reapply`, a scale-set model update,
automatic instance repair) sets `Succeeded` again. So the gate keeps waiting
on `Failed` (logged as a warning) and leaves the decision to the timeout, as
it does for `Creating`, `Updating` and the rest; pass `ready_states` to accept
more states.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Collection
from typing import Any

import httpx

from supervisor.retry_after import honour_retry_after, parse_retry_after
from worker.common.backoff import Backoff
from worker.common.text import one_line

log = logging.getLogger(__name__)

ARM_SCOPE = "https://management.azure.com/.default"
ARM_API_VERSION = "2024-07-01"
READY_STATES = ("Succeeded",)


class ProvisioningTimeout(Exception):
    """The resource did not reach a ready state in time. str() is one line."""

    def __init__(self, resource_id: str, timeout_s: float, last_state: str | None, last_error: str | None) -> None:
        seen = f"last state {last_state!r}" if last_state else "no state seen"
        if last_error:
            seen += f", last error: {last_error}"
        super().__init__(f"provisioning gate: {resource_id} not Succeeded after {timeout_s:g}s ({seen})")
        self.resource_id = resource_id
        self.timeout_s = timeout_s
        self.last_state = last_state
        self.last_error = last_error


class _PollError(Exception):
    """One failed poll; the message is short and goes into logs and the timeout."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def resource_url(arm_endpoint: str, resource_id: str, api_version: str = ARM_API_VERSION) -> str:
    """`{arm_endpoint}{resource_id}?api-version=...` (without the query: httpx adds it)."""
    if not resource_id.startswith("/subscriptions/"):
        raise ValueError(f"resource id must start with /subscriptions/, got {resource_id!r}")
    if not arm_endpoint.startswith(("https://", "http://")):
        raise ValueError(f"ARM endpoint must be an http(s) URL, got {arm_endpoint!r}")
    return arm_endpoint.rstrip("/") + resource_id


def wait_for_provisioning(
    resource_id: str,
    arm_endpoint: str,
    timeout_s: float,
    credential: Any = None,
    *,
    client_id: str | None = None,
    scope: str = ARM_SCOPE,
    api_version: str = ARM_API_VERSION,
    ready_states: Collection[str] = READY_STATES,
    initial_delay_s: float = 1.0,
    max_delay_s: float = 30.0,
    request_timeout_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Poll ARM until `properties.provisioningState` of `resource_id` is ready.

    `credential` is any azure-core `TokenCredential`; by default a
    `ManagedIdentityCredential` (user-assigned when `client_id` is given),
    closed on return. Returns None once ready; raises `ProvisioningTimeout`
    after `timeout_s` (measured on `clock`), `ValueError` for arguments that
    can never work. A token request in flight is not interrupted, so the gate
    may overrun `timeout_s` by at most one such request.
    """
    url = resource_url(arm_endpoint, resource_id, api_version)
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be greater than 0, got {timeout_s}")
    own_credential = credential is None
    if own_credential:
        from azure.identity import ManagedIdentityCredential

        credential = ManagedIdentityCredential(client_id=client_id) if client_id else ManagedIdentityCredential()
    deadline = clock() + timeout_s
    last_state: str | None = None
    last_error: str | None = None
    backoff = Backoff(initial_delay_s, max_delay_s, jitter="equal")
    try:
        with httpx.Client(trust_env=False, timeout=request_timeout_s,
                          headers={"User-Agent": "spot-supervisor-provisioning-gate"}) as client:
            while True:
                retry_after_s: float | None = None
                try:
                    state = _poll(client, credential, url, scope, api_version, max(0.1, min(request_timeout_s, deadline - clock())))
                except _PollError as exc:
                    if str(exc) != last_error:
                        log.warning("provisioning gate: %s: %s (retrying)", resource_id, exc)
                    last_error = str(exc)
                    retry_after_s = exc.retry_after_s
                else:
                    last_error = None
                    if state in ready_states:
                        log.info("provisioning gate: %s is %s", resource_id, state)
                        return
                    if state != last_state:
                        level = logging.WARNING if state == "Failed" else logging.INFO
                        log.log(level, "provisioning gate: %s is %s, waiting for %s", resource_id, state, "/".join(ready_states))
                    last_state = state
                remaining = deadline - clock()
                if remaining <= 0:
                    raise ProvisioningTimeout(resource_id, timeout_s, last_state, last_error)
                sleep(min(honour_retry_after(backoff.next_delay(), retry_after_s), remaining))
    finally:
        if own_credential:
            close = getattr(credential, "close", None)
            if callable(close):
                close()


def _poll(client: httpx.Client, credential: Any, url: str, scope: str, api_version: str, timeout_s: float) -> str:
    """One GET of the resource; its provisioningState, or _PollError."""
    try:
        token = credential.get_token(scope).token
    except Exception as exc:  # azure-identity raises several types; all mean "not yet"
        raise _PollError(f"no token for {scope}: {one_line(exc)}") from exc
    try:
        response = client.get(url, params={"api-version": api_version},
                              headers={"Authorization": f"Bearer {token}"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise _PollError(f"GET {url}: {type(exc).__name__}: {one_line(exc)}") from exc
    if response.status_code != 200:
        raise _PollError(f"GET {url}: HTTP {response.status_code}{_arm_error(response)}",
                         retry_after_s=parse_retry_after(response.headers.get("Retry-After")))
    try:
        body = response.json()
        state = body["properties"]["provisioningState"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise _PollError(f"GET {url}: no properties.provisioningState in the response ({type(exc).__name__})") from exc
    if not isinstance(state, str) or not state:
        raise _PollError(f"GET {url}: provisioningState is {state!r}")
    return state


def _arm_error(response: httpx.Response) -> str:
    """` Code: message` from an ARM error body, when there is one."""
    try:
        error = response.json().get("error", {})
        code, message = error.get("code", ""), error.get("message", "")
    except (ValueError, AttributeError):
        return ""
    text = " ".join(part for part in (f"{code}:" if code else "", message) if part)
    return f" {one_line(text)[:300]}" if text else ""


