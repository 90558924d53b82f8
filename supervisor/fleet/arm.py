"""Azure Resource Manager through azure-mgmt-compute (the `fleet` extra): the scale-set operations.

Reads return a ScaleSetView, with error_kind set instead of raising (403, 404, a timeout, garbage):
one bad scale set never stops the others. Writes raise `ArmRefused` with the error code; an
allocation failure (capacity, quota) has `allocation=True`. 429 and 5xx are retried by azure-core's
retry policy, which honours Retry-After (bounded here by retry count and timeouts).
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from supervisor.fleet.model import BAD_ANSWER, FORBIDDEN, NOT_FOUND, UNREACHABLE, BadArmAnswer, ScaleSetView, parse_scale_set
from worker.common.text import one_line

log = logging.getLogger(__name__)

ALLOCATION_CODES = frozenset(code.lower() for code in (
    "SkuNotAvailable", "AllocationFailed", "OverconstrainedAllocationRequest", "ZonalAllocationFailed",
    "OverconstrainedZonalAllocationRequest", "AllocationFailedQuotaExceeded", "QuotaExceeded",
    "OperationNotAllowed", "SpotVMCapacityNotAvailable", "NotEnoughCapacity", "CapacityNotAvailable"))
LRO_POLL_S = 1.0  # used only when ARM sends no Retry-After with a long-running operation
_ID = re.compile(r"^/subscriptions/([^/]+)/resourceGroups/([^/]+)/providers/Microsoft\.Compute/virtualMachineScaleSets/([^/]+)$",
                 re.IGNORECASE)


class ArmRefused(Exception):
    def __init__(self, scale_set_id: str, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{scale_set_id.rsplit('/', 1)[-1]}: {code}: {one_line(message)[:300]}")
        self.code, self.status = code, status
        self.allocation = code.lower() in ALLOCATION_CODES
        self.kind = FORBIDDEN if status == 403 else NOT_FOUND if status == 404 else UNREACHABLE


def make_credential(client_id: str) -> Any:
    """Managed identity by default (client_id: a user-assigned one); azure-identity's environment
    credential when AZURE_CLIENT_SECRET / AZURE_CLIENT_CERTIFICATE_PATH / AZURE_FEDERATED_TOKEN_FILE say so."""
    from azure.identity import DefaultAzureCredential, EnvironmentCredential, ManagedIdentityCredential

    if os.environ.get("AZURE_CLIENT_SECRET") or os.environ.get("AZURE_CLIENT_CERTIFICATE_PATH"):
        return EnvironmentCredential()
    if os.environ.get("AZURE_FEDERATED_TOKEN_FILE"):
        return DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return ManagedIdentityCredential(client_id=client_id or None)


class FleetArm:
    def __init__(self, endpoint: str, credential: Any, request_timeout_s: float) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.credential = credential
        self.timeout_s = request_timeout_s
        self._clients: dict[str, Any] = {}

    def _client(self, subscription: str) -> Any:
        from azure.mgmt.compute import ComputeManagementClient

        if subscription not in self._clients:
            self._clients[subscription] = ComputeManagementClient(
                self.credential, subscription, base_url=self.endpoint, polling_interval=LRO_POLL_S,
                credential_scopes=[f"{self.endpoint}/.default" if "management.azure.com" not in self.endpoint
                                   else "https://management.azure.com/.default"],
                connection_timeout=min(self.timeout_s, 10.0), read_timeout=self.timeout_s,
                retry_total=4, retry_backoff_max=60)
        return self._clients[subscription]

    @staticmethod
    def _parts(scale_set_id: str) -> tuple[str, str, str]:
        match = _ID.match(scale_set_id)
        if match is None:  # settings validation makes this unreachable
            raise ValueError(f"not a scale-set resource ID: {scale_set_id}")
        return match.group(1), match.group(2), match.group(3)

    def read(self, scale_set_id: str) -> ScaleSetView:
        """The scale set and its instances with their instance view; errors become error_kind."""
        subscription, group, name = self._parts(scale_set_id)
        try:
            client = self._client(subscription)
            doc = client.virtual_machine_scale_sets.get(group, name).as_dict()
            items = [vm.as_dict() for vm in client.virtual_machine_scale_set_vms.list(group, name, expand="instanceView")]
            return parse_scale_set(scale_set_id, doc, items)
        except BadArmAnswer as exc:
            return ScaleSetView(scale_set_id, error_kind=BAD_ANSWER, error=str(exc))
        except Exception as exc:  # one scale set's failure, whatever it is, is reported and skipped
            return ScaleSetView(scale_set_id, error_kind=_error_kind(exc), error=_describe(exc))

    def set_capacity(self, scale_set_id: str, capacity: int) -> None:
        subscription, group, name = self._parts(scale_set_id)
        self._write(scale_set_id, lambda c: c.virtual_machine_scale_sets.begin_update(group, name, {"sku": {"capacity": capacity}}),
                    subscription)

    def delete_instances(self, scale_set_id: str, instance_ids: list[str]) -> None:
        subscription, group, name = self._parts(scale_set_id)
        self._write(scale_set_id, lambda c: c.virtual_machine_scale_sets.begin_delete_instances(
            group, name, {"instanceIds": instance_ids}), subscription)

    def start_instances(self, scale_set_id: str, instance_ids: list[str]) -> None:
        subscription, group, name = self._parts(scale_set_id)
        self._write(scale_set_id, lambda c: c.virtual_machine_scale_sets.begin_start(
            group, name, {"instanceIds": instance_ids}), subscription)

    def _write(self, scale_set_id: str, begin: Any, subscription: str) -> None:
        try:
            begin(self._client(subscription)).result(timeout=max(60.0, self.timeout_s * 10))
        except Exception as exc:
            error = getattr(exc, "error", None)
            code = getattr(error, "code", None) or type(exc).__name__
            raise ArmRefused(scale_set_id, str(code), _describe(exc), getattr(exc, "status_code", None)) from None


def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if status == 403:
        return FORBIDDEN
    if status == 404:
        return NOT_FOUND
    if isinstance(exc, (ValueError, RecursionError)) or type(exc).__name__ == "DecodeError":
        return BAD_ANSWER
    return UNREACHABLE


def _describe(exc: BaseException) -> str:
    error = getattr(exc, "error", None)
    code, message = getattr(error, "code", None), getattr(error, "message", None)
    status = getattr(exc, "status_code", None)
    if code:
        return one_line(f"{status or ''} {code}: {message or ''}".strip())[:300]
    return one_line(f"{type(exc).__name__}: {exc}")[:300]
