"""Azure Instance Metadata Service (IMDS): who and what this VM is.

The supervisor is the only process that talks to IMDS. Every failure surfaces
as `ImdsError` with a one-line message, whatever the cause (timeout, refused
connection, HTTP status, unexpected payload).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, TypeGuard

import httpx

from supervisor.retry_after import parse_retry_after
from worker.common import jsonsafe
from worker.common.text import one_line

log = logging.getLogger(__name__)

INSTANCE_API_VERSION = "2021-02-01"
METADATA_HEADERS = {"Metadata": "true"}
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024  # a real one is a few KB


class ImdsError(Exception):
    """IMDS could not be reached or answered something unusable.

    `status` is the HTTP status when there was a response; `retry_after_s` is
    the server's Retry-After (seconds) when it sent one.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    vm_size: str
    priority: str
    eviction_policy: str
    resource_id: str
    location: str
    vm_scale_set_name: str

    @property
    def is_spot(self) -> bool:
        return self.priority.lower() == "spot"


def fetch_instance_info(endpoint: str, timeout_s: float) -> InstanceInfo:
    """GET /metadata/instance and return the compute facts the supervisor needs."""
    url = f"{endpoint.rstrip('/')}/metadata/instance"
    with httpx.Client(trust_env=False, timeout=timeout_s) as client:
        response = send(client, "GET", url, params={"api-version": INSTANCE_API_VERSION})
    if response.status_code != 200:
        raise status_error("GET", url, response)
    info = parse_instance(response.content)
    log.debug("instance metadata: %s", info)
    return info


def parse_instance(raw: bytes | str) -> InstanceInfo:
    data = load_json(raw, "instance metadata")
    compute = data.get("compute") if isinstance(data, dict) else None
    if not isinstance(compute, dict):
        raise ImdsError("instance metadata: no 'compute' object in the response")

    def text(key: str, required: bool = False) -> str:
        value = compute.get(key, "")
        if not isinstance(value, str) or (required and not value):
            raise ImdsError(f"instance metadata: compute.{key} must be a non-empty string, got {value!r}"
                            if required else f"instance metadata: compute.{key} must be a string, got {value!r}")
        return value

    return InstanceInfo(
        name=text("name", required=True),
        vm_size=text("vmSize", required=True),
        priority=text("priority"),
        eviction_policy=text("evictionPolicy"),
        resource_id=text("resourceId"),
        location=text("location"),
        vm_scale_set_name=text("vmScaleSetName"),
    )


# Helpers shared with scheduled_events: one place that turns httpx failures
# into one-line ImdsErrors.

def send(client: httpx.Client, method: str, url: str, *, headers: dict[str, str] | None = None,
         **kwargs: Any) -> httpx.Response:
    try:
        request = client.build_request(method, url, headers={**METADATA_HEADERS, **(headers or {})}, **kwargs)
        response = client.send(request, stream=True)
        try:  # read up to the cap only: a runaway answer costs this much memory, no more
            body = bytearray()
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ImdsError(f"IMDS {method} {url}: answer over {MAX_DOCUMENT_BYTES} bytes; not read further",
                                    status=response.status_code)
        finally:
            response.close()
        # The body is decoded already: headers that would make httpx decode or frame it again are left out.
        kept = [(k, v) for k, v in response.headers.items()
                if k.lower() not in ("content-encoding", "transfer-encoding", "content-length")]
        return httpx.Response(response.status_code, headers=kept, content=bytes(body), request=request)
    except httpx.TimeoutException as exc:
        raise ImdsError(f"IMDS {method} {url}: timed out ({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        raise ImdsError(f"IMDS {method} {url}: {type(exc).__name__}: {one_line(str(exc)) or 'no detail'}") from None


def status_error(method: str, url: str, response: httpx.Response) -> ImdsError:
    detail = one_line(response.text)[:200]
    return ImdsError(
        f"IMDS {method} {url}: HTTP {response.status_code}" + (f": {detail}" if detail else ""),
        status=response.status_code,
        retry_after_s=parse_retry_after(response.headers.get("Retry-After")),
    )


def load_json(raw: bytes | str, what: str) -> Any:
    try:
        return jsonsafe.loads(raw, max_bytes=MAX_DOCUMENT_BYTES)
    except jsonsafe.JsonError as exc:
        raise ImdsError(f"{what}: not valid JSON ({exc})") from None


def is_json_int(value: Any) -> TypeGuard[int]:
    """A JSON integer (json.loads gives bool for true/false, which is an int subclass)."""
    return isinstance(value, int) and not isinstance(value, bool)
