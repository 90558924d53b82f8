"""EC2 instance metadata (IMDSv2): Spot interruption, rebalance recommendation, Auto Scaling scale-in.

A session token (PUT /latest/api/token) goes with every GET; it is renewed before the lifetime
the token endpoint granted runs out, and after a 401. When no token can be had the GETs go
without one (IMDSv1): where v2 is required they answer 401, which is a failed poll like any other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx

from supervisor.events.azure import EventsDocument
from supervisor.events.cloud_notices import CloudNotice, NoticeBook, decode_json, decode_word, parse_utc
from supervisor.vm.imds import ImdsError, InstanceInfo, send, status_error

log = logging.getLogger(__name__)

TOKEN_PATH = "/latest/api/token"
META = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
REQUESTED_TTL_S = 21600  # the most AWS grants
MAX_TOKEN_CHARS = 4096
# The token endpoint refused v2 outright (403/404/405): ask again this much later.
V1_RECHECK_S = 300.0
SPOT_ACTIONS = ("terminate", "stop", "hibernate")


class AwsInstanceMetadata:
    name = "AWS instance metadata"
    acknowledges = False  # EC2 has no acknowledgement: the instance goes at `time` regardless

    def __init__(self, endpoint: str, request_timeout_s: float, vm_name: str = "", *, on_rebalance: str = "ignore",
                 unannounced_notice_s: float = 35.0, clock: Callable[[], float] = time.monotonic) -> None:
        """`unannounced_notice_s`: the NotBefore, from first sight, of a notice with no time of its own
        (a scale-in, a rebalance to drain for): the SIGTERM drain timeout plus the safety margin."""
        self.base = endpoint.rstrip("/")
        self.vm_name = vm_name
        self._timeout_s = request_timeout_s
        self._on_rebalance = on_rebalance
        self._unannounced_notice_s = unannounced_notice_s
        self._clock = clock
        self._client = httpx.Client(trust_env=False)
        self._token: str | None = None
        self._token_renew_at = 0.0
        self._token_problem = ""
        self._v1_until = 0.0
        self._renewed_after_401 = False  # this poll: a 401 storm costs one token request per poll, not per path
        self._book = NoticeBook("AWS")
        self._last: dict[str, list[CloudNotice]] = {}
        self._rebalances_logged: set[str] = set()

    # -- the EventSource seam --------------------------------------------------

    def poll(self) -> EventsDocument:
        notices: list[CloudNotice] = []
        errors: list[str] = []
        self._renewed_after_401 = False
        for part, read in (("spot", self._spot_action), ("rebalance", self._rebalance), ("lifecycle", self._lifecycle)):
            try:
                self._last[part] = read()
            except ImdsError as exc:  # keep what it said last: a failing path withdraws nothing
                errors.append(str(exc))
            notices += self._last.get(part, [])
        if errors and all(self._book.has(n.event_id) for n in notices):
            raise ImdsError("; ".join(errors))
        return self._book.document(self._name(), notices)

    def acknowledge(self, event_id: str) -> None:
        raise ImdsError("EC2 has no acknowledgement of interruption notices")

    def next_poll_in(self, interval_s: float) -> float:
        return interval_s

    def instance_info(self, timeout_s: float | None = None) -> InstanceInfo:
        self._renewed_after_401 = False

        def word(path: str, required: bool = True) -> str:
            raw = self._get(path, timeout_s)
            if raw is None:
                if required:
                    raise ImdsError(f"AWS instance metadata: {path} not found")
                return ""
            return decode_word(raw, f"AWS {path}")

        info = InstanceInfo(name=word("instance-id"), vm_size=word("instance-type"),
                            priority=word("instance-life-cycle", required=False), eviction_policy="",
                            resource_id="", location=word("placement/region", required=False), vm_scale_set_name="")
        if not self.vm_name:
            self.vm_name = info.name
        return info

    def close(self) -> None:
        self._client.close()

    # -- the three notices -----------------------------------------------------

    def _spot_action(self) -> list[CloudNotice]:
        raw = self._get("spot/instance-action")
        if raw is None:
            return []
        data = decode_json(raw, "AWS spot/instance-action")
        if not isinstance(data, dict) or not isinstance(data.get("action"), str) or not data["action"]:
            raise ImdsError("AWS spot/instance-action: expected {\"action\": ..., \"time\": ...}")
        action, at = data["action"], parse_utc(data.get("time"), "AWS spot/instance-action time")
        known = "" if action in SPOT_ACTIONS else " (an action this supervisor does not know: drained for all the same)"
        return [CloudNotice(f"aws-spot-{action}-{data['time']}", "Preempt",
                            f"EC2 Spot interruption: {action} at {data['time']}{known}", not_before=at)]

    def _rebalance(self) -> list[CloudNotice]:
        raw = self._get("events/recommendations/rebalance")
        if raw is None:
            return []
        data = decode_json(raw, "AWS events/recommendations/rebalance")
        if not isinstance(data, dict):
            raise ImdsError("AWS events/recommendations/rebalance: expected {\"noticeTime\": ...}")
        parse_utc(data.get("noticeTime"), "AWS rebalance noticeTime")
        notice_time = str(data["noticeTime"])
        if self._on_rebalance != "drain":
            if notice_time not in self._rebalances_logged:
                self._rebalances_logged.add(notice_time)
                log.warning("EC2 rebalance recommendation (noticeTime %s): elevated risk of interruption; "
                            "working on (events.on_rebalance = \"ignore\")", notice_time)
            return []
        return [CloudNotice(f"aws-rebalance-{notice_time}", "Preempt",
                            f"EC2 rebalance recommendation at {notice_time} (events.on_rebalance = \"drain\")",
                            notice_s=self._unannounced_notice_s)]

    def _lifecycle(self) -> list[CloudNotice]:
        raw = self._get("autoscaling/target-lifecycle-state")
        if raw is None:  # not in an Auto Scaling group
            return []
        state = decode_word(raw, "AWS autoscaling/target-lifecycle-state")
        if state != "Terminated":
            return []
        return [CloudNotice("aws-asg-terminated", "Terminate", "Auto Scaling target lifecycle state Terminated (scale-in)",
                            notice_s=self._unannounced_notice_s)]

    # -- HTTP ----------------------------------------------------------------

    def _get(self, path: str, timeout_s: float | None = None) -> bytes | None:
        """The answer's body, None for 404; ImdsError otherwise."""
        url = f"{self.base}{META}{path}"
        timeout = timeout_s or self._timeout_s
        response = self._send_get(url, self._session_token(), timeout)
        if response.status_code == 401 and not self._renewed_after_401:  # expired, or never valid: a new one, once
            self._renewed_after_401 = True
            self._token = None
            token = self._session_token()
            if token is not None:
                response = self._send_get(url, token, timeout)
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            error = status_error("GET", url, response)
            if response.status_code == 401 and self._token_problem:
                raise ImdsError(f"{error}; and no session token: {self._token_problem}", status=401)
            raise error
        return response.content

    def _send_get(self, url: str, token: str | None, timeout: float) -> httpx.Response:
        return send(self._client, "GET", url, headers={TOKEN_HEADER: token} if token else None, timeout=timeout)

    def _session_token(self) -> str | None:
        now = self._clock()
        if self._token is not None and now < self._token_renew_at:
            return self._token
        if now < self._v1_until:
            return None
        url = f"{self.base}{TOKEN_PATH}"
        self._token = None
        try:
            response = send(self._client, "PUT", url, headers={TTL_HEADER: str(REQUESTED_TTL_S)}, timeout=self._timeout_s)
        except ImdsError as exc:
            self._token_problem = str(exc)
            return None
        if response.status_code in (403, 404, 405):
            self._v1_until = now + V1_RECHECK_S
            self._token_problem = f"PUT {url}: HTTP {response.status_code}"
            log.warning("AWS token endpoint answered HTTP %d: using IMDSv1 (no session token) for %.0fs",
                        response.status_code, V1_RECHECK_S)
            return None
        if response.status_code != 200:
            self._token_problem = str(status_error("PUT", url, response))
            return None
        token = response.text.strip()
        if not token or len(token) > MAX_TOKEN_CHARS or not token.isprintable():
            self._token_problem = f"PUT {url}: not a token ({len(token)} characters)"
            return None
        granted = _granted_ttl(response.headers.get(TTL_HEADER))
        # Renewed a fifth of its lifetime (at most a minute) early: never sent once expired.
        self._token, self._token_renew_at = token, now + granted - min(60.0, granted / 5)
        self._token_problem = ""
        log.debug("AWS session token for %ss", granted)
        return token

    def _name(self) -> str:
        return self.vm_name or "this instance"

    def __enter__(self) -> AwsInstanceMetadata:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _granted_ttl(header: str | None) -> float:
    """The lifetime the token endpoint granted; what was asked for when it does not say."""
    try:
        granted = float(header) if header is not None else float(REQUESTED_TTL_S)
    except ValueError:
        return float(REQUESTED_TTL_S)
    return granted if 0 < granted <= REQUESTED_TTL_S else float(REQUESTED_TTL_S)
