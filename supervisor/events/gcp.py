"""Google Compute Engine metadata: Spot/preemptible preemption and host maintenance that stops the VM.

`instance/preempted` is watched (`wait_for_change` with the last ETag): the request hangs until the
value changes, so a preemption is seen at once rather than at the next poll. A watch that fails (a
hang past its timeout, a server that answers at once without a change) falls back to plain polls
for a while. `instance/maintenance-event` is read once per round. A 503 (served during maintenance)
is a failed poll like any other, never a notice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from supervisor.events.azure import EventsDocument
from supervisor.events.cloud_notices import CloudNotice, NoticeBook, decode_word
from supervisor.vm.imds import ImdsError, InstanceInfo, send, status_error

log = logging.getLogger(__name__)

INSTANCE = "/computeMetadata/v1/instance/"
FLAVOR = {"Metadata-Flavor": "Google"}
PREEMPTION_NOTICE_S = 30.0  # from the change to TRUE until the VM is stopped
MAINTENANCE_NOTICE_S = 60.0
WATCH_TIMEOUT_S = 5  # also how often maintenance-event is read while the watch waits
WATCH_RETRY_S = 300.0  # after a failed watch, plain polls this long before watching again


class GcpMetadata:
    name = "Google Cloud metadata"
    acknowledges = False

    def __init__(self, endpoint: str, request_timeout_s: float, vm_name: str = "", *,
                 watch_timeout_s: int = WATCH_TIMEOUT_S, clock: Callable[[], float] = time.time) -> None:
        self.base = endpoint.rstrip("/") + INSTANCE
        self.vm_name = vm_name
        self._timeout_s = request_timeout_s
        self._watch_timeout_s = watch_timeout_s
        self._clock = clock
        self._client = httpx.Client(trust_env=False)
        self._etag: str | None = None
        self._poll_until = 0.0  # monotonic: plain polls until then
        self._book = NoticeBook("GCP")
        self._last: dict[str, list[CloudNotice]] = {}
        self._clear_at: dict[str, float] = {}  # when each value was last read as "no notice"

    @property
    def watching(self) -> bool:
        return self._etag is not None and time.monotonic() >= self._poll_until

    # -- the EventSource seam --------------------------------------------------

    def poll(self) -> EventsDocument:
        notices: list[CloudNotice] = []
        errors: list[str] = []
        for part, read in (("maintenance", self._maintenance), ("preempted", self._preempted)):
            try:
                self._last[part] = read()
            except ImdsError as exc:  # keep what it said last: a failing path withdraws nothing
                errors.append(str(exc))
            notices += self._last.get(part, [])
        if errors and all(self._book.has(n.event_id) for n in notices):
            raise ImdsError("; ".join(errors))
        return self._book.document(self.vm_name or "this instance", notices)

    def acknowledge(self, event_id: str) -> None:
        raise ImdsError("Google Cloud has no acknowledgement of preemption or maintenance notices")

    def next_poll_in(self, interval_s: float) -> float:
        # The watch itself waits for the change: the next one goes out at once.
        return 0.0 if self.watching else interval_s

    def instance_info(self, timeout_s: float | None = None) -> InstanceInfo:
        def word(path: str) -> str:
            return decode_word(self._get(path, timeout_s=timeout_s)[0], f"GCP {path}", r"A-Za-z0-9_:.\-/")

        def optional(path: str) -> str:
            try:
                return word(path)
            except ImdsError as exc:
                if exc.status != 404:
                    raise
                return ""

        spot = optional("scheduling/provisioning-model").upper() == "SPOT" or optional("scheduling/preemptible") == "TRUE"
        info = InstanceInfo(name=word("name"), vm_size=word("machine-type").rsplit("/", 1)[-1],
                            priority="Spot" if spot else "Standard", eviction_policy="", resource_id="",
                            location=word("zone").rsplit("/", 1)[-1], vm_scale_set_name="")
        if not self.vm_name:
            self.vm_name = info.name
        return info

    def close(self) -> None:
        self._client.close()

    # -- the two notices -------------------------------------------------------

    def _maintenance(self) -> list[CloudNotice]:
        value = decode_word(self._get("maintenance-event")[0], "GCP maintenance-event")
        if value != "TERMINATE_ON_HOST_MAINTENANCE":  # NONE, or MIGRATE_ON_HOST_MAINTENANCE (live migration)
            self._clear_at["maintenance"] = self._clock()
            return []
        # It may have appeared just after the last read that said otherwise: count from there.
        since = self._clear_at.get("maintenance", self._clock())
        return [CloudNotice("gcp-maintenance-terminate", "Terminate", "host maintenance that stops this VM",
                            not_before=since + MAINTENANCE_NOTICE_S)]

    def _preempted(self) -> list[CloudNotice]:
        watched = self.watching
        started = time.monotonic()
        try:
            raw, etag = self._get("preempted", watch=watched)
        except ImdsError as exc:
            if watched and exc.status is None:  # hung past its timeout, or cut: poll plainly for a while
                self._fall_back(f"the watch of preempted failed ({exc})")
            raise
        value = decode_word(raw, "GCP preempted")
        if value not in ("TRUE", "FALSE"):
            raise ImdsError(f"GCP preempted: expected TRUE or FALSE, got {value[:40]!r}")
        if watched and etag == self._etag and time.monotonic() - started < self._watch_timeout_s / 2:
            self._fall_back("the metadata server answered a watch at once without a change")
        self._etag = etag or None
        now = self._clock()
        if value == "FALSE":
            self._clear_at["preempted"] = now
            return []
        since = now if watched else self._clear_at.get("preempted", now)
        return [CloudNotice("gcp-preempted", "Preempt", "Spot/preemptible VM preempted", not_before=since + PREEMPTION_NOTICE_S)]

    def _fall_back(self, why: str) -> None:
        self._poll_until = time.monotonic() + WATCH_RETRY_S
        log.warning("%s: polling instead for %.0fs", why, WATCH_RETRY_S)

    # -- HTTP ----------------------------------------------------------------

    def _get(self, path: str, *, watch: bool = False, timeout_s: float | None = None) -> tuple[bytes, str]:
        url = self.base + path
        params: dict[str, str] = {}
        timeout = timeout_s or self._timeout_s
        if watch and self._etag:
            params = {"wait_for_change": "true", "last_etag": self._etag, "timeout_sec": str(self._watch_timeout_s)}
            timeout += self._watch_timeout_s
        response = send(self._client, "GET", url, params=params, headers=FLAVOR, timeout=timeout)
        if response.status_code != 200:
            raise status_error("GET", url, response)
        return response.content, response.headers.get("ETag", "")

    def __enter__(self) -> GcpMetadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
