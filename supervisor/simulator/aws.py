"""The EC2 instance metadata service (IMDSv2) as a model, for `simulate --cloud aws` and the tests.

Shapes as tests/fixtures/aws/README.md documents them. Metadata paths:
  PUT /latest/api/token                      X-aws-ec2-metadata-token-ttl-seconds: 1..21600 → the token,
                                             the granted lifetime in the same response header
  GET /latest/meta-data/<path>               X-aws-ec2-metadata-token required (401 without a valid one)
      spot/instance-action  events/recommendations/rebalance  autoscaling/target-lifecycle-state
      instance-id  instance-type  placement/region  instance-life-cycle
Control (JSON):
  POST   /simulate/eviction   {"delay_s": 120, "action": "terminate", "after_s": 0}   DELETE: withdrawn
  POST   /simulate/rebalance  {}                                                      DELETE: withdrawn
  POST   /simulate/lifecycle  {"state": "Terminated"}     ({"state": null}: not in a group, 404)
  POST   /simulate/raw        {"path": "spot/instance-action", "status": 200, "body": "..."}  DELETE: all cleared
  POST   /simulate/token      {"max_ttl_s": 2}  grant at most this; {"expire": true} expires every token now
  POST   /simulate/faults     {"mode": "401"|"token-down"|"imdsv1"|"garbage"|"reset"|"hang", "count": n}
                              (imdsv1: PUT answers 404 and GETs need no token, until reset)
  POST   /simulate/reset      GET /simulate/state   GET /simulate/requests
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

from supervisor.simulator.metadata_http import Reply
from supervisor.simulator.state import BadRequest

META = "/latest/meta-data/"
TTL_HEADER = "x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "x-aws-ec2-metadata-token"
FAULTS = ("401", "token-down", "imdsv1", "garbage", "reset", "hang")
GARBAGE = b'{"action": "terminate", "time": '


def iso_utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class AwsMetadata:
    cloud = "aws"

    def __init__(self, *, instance_id: str = "i-0abc1234def567890", instance_type: str = "m5.large",
                 region: str = "us-east-1", spot: bool = True, notice_s: float = 120.0) -> None:
        self.instance_id = instance_id
        self.instance_type = instance_type
        self.region = region
        self.spot = spot
        self.notice_s = notice_s
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.tokens: dict[str, float] = {}  # token → expiry (time.time())
        self.token_requests: list[dict[str, Any]] = []  # every PUT: {"time", "ttl_asked", "granted", "status"}
        self.unauthorised = 0  # GETs answered 401
        self.max_ttl_s = 21600
        self.action: dict[str, Any] | None = None  # {"action", "time", "visible_at"}
        self.rebalance: str | None = None
        self.lifecycle: str | None = None
        self.raw: dict[str, tuple[int, str]] = {}
        self.fault, self.fault_count = "", 0
        self.imdsv1 = False

    # -- metadata ----------------------------------------------------------------

    def serve(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Reply:
        with self._lock:
            if path == "/latest/api/token":
                return self._token(method, headers)
            if not path.startswith(META) or method != "GET":
                return Reply.text(404 if method == "GET" else 405, "Not Found" if method == "GET" else "Method Not Allowed")
            fault = self._take_fault(("401", "garbage", "reset", "hang"))
            if fault == "reset":
                return Reply(0, reset=True)
            if fault == "hang":
                return Reply(0, hang=True)
            token = headers.get(TOKEN_HEADER)
            if fault == "401" or (not self.imdsv1 and self.tokens.get(token or "", 0.0) <= time.time()):
                self.unauthorised += 1
                return Reply.text(401, "Unauthorized")
            if fault == "garbage":
                return Reply(200, GARBAGE, {"Content-Type": "text/plain"})
            return self._get(path[len(META):])

    def _token(self, method: str, headers: dict[str, str]) -> Reply:
        if method != "PUT":
            return Reply.text(405, "Method Not Allowed")
        asked = headers.get(TTL_HEADER, "")
        record: dict[str, Any] = {"time": time.time(), "ttl_asked": asked}
        self.token_requests.append(record)
        if self.imdsv1:
            record["status"] = 404
            return Reply.text(404, "Not Found")
        if self._take_fault(("token-down",)):
            record["status"] = 503
            return Reply.text(503, "Service Unavailable")
        if "x-forwarded-for" in headers:
            record["status"] = 403
            return Reply.text(403, "Forbidden")
        if not asked.isdigit() or not 1 <= int(asked) <= 21600:
            record["status"] = 400
            return Reply.text(400, "Bad Request")
        granted = min(int(asked), self.max_ttl_s)
        token = secrets.token_urlsafe(42)
        self.tokens[token] = time.time() + granted
        record.update(status=200, granted=granted)
        return Reply.text(200, token, **{"X-aws-ec2-metadata-token-ttl-seconds": str(granted)})

    def _get(self, sub: str) -> Reply:
        if sub in self.raw:
            status, body = self.raw[sub]
            return Reply.text(status, body)
        now = time.time()
        if sub == "spot/instance-action" and self.action is not None and now >= self.action["visible_at"]:
            return Reply.json(200, {"action": self.action["action"], "time": self.action["time"]})
        if sub == "events/recommendations/rebalance" and self.rebalance is not None:
            return Reply.json(200, {"noticeTime": self.rebalance})
        if sub == "autoscaling/target-lifecycle-state" and self.lifecycle is not None:
            return Reply.text(200, self.lifecycle)
        facts = {"instance-id": self.instance_id, "instance-type": self.instance_type, "placement/region": self.region,
                 "instance-life-cycle": "spot" if self.spot else "on-demand"}
        if sub in facts:
            return Reply.text(200, facts[sub])
        return Reply.text(404, "Not Found")

    def _take_fault(self, modes: tuple[str, ...]) -> str:
        if self.fault in modes and self.fault_count > 0:
            self.fault_count -= 1
            return self.fault
        return ""

    # -- control -----------------------------------------------------------------

    def simulate_eviction(self, delay_s: float | None = None, action: str = "terminate", after_s: float = 0.0) -> dict[str, Any]:
        visible_at = time.time() + after_s
        with self._lock:
            self.action = {"action": action, "time": iso_utc(visible_at + (self.notice_s if delay_s is None else delay_s)),
                           "visible_at": visible_at}
            return dict(self.action)

    def control(self, method: str, path: str, data: dict[str, Any]) -> Any:
        route = (method, path)
        if route == ("POST", "/simulate/eviction"):
            return self.simulate_eviction(_number(data, "delay_s"), str(data.get("action", "terminate")),
                                          _number(data, "after_s") or 0.0)
        with self._lock:
            if route == ("DELETE", "/simulate/eviction"):
                self.action = None
            elif route == ("POST", "/simulate/rebalance"):
                self.rebalance = iso_utc(time.time())
            elif route == ("DELETE", "/simulate/rebalance"):
                self.rebalance = None
            elif route == ("POST", "/simulate/lifecycle"):
                state = data.get("state")
                if state is not None and not isinstance(state, str):
                    raise BadRequest("state must be a string such as Terminated, or null")
                self.lifecycle = state
            elif route == ("POST", "/simulate/raw"):
                self.raw[str(data["path"])] = (int(data.get("status", 200)), str(data.get("body", "")))
            elif route == ("DELETE", "/simulate/raw"):
                self.raw.clear()
            elif route == ("POST", "/simulate/token"):
                if data.get("expire"):
                    self.tokens = {t: 0.0 for t in self.tokens}
                if "max_ttl_s" in data:
                    self.max_ttl_s = int(data["max_ttl_s"])
            elif route == ("POST", "/simulate/faults"):
                mode = str(data.get("mode", ""))
                if mode not in FAULTS:
                    raise BadRequest(f"mode must be one of {', '.join(FAULTS)}, got {mode!r}")
                if mode == "imdsv1":
                    self.imdsv1 = True
                else:
                    self.fault, self.fault_count = mode, int(data.get("count", 1))
            elif route == ("POST", "/simulate/reset"):
                self._reset()
            elif route != ("GET", "/simulate/state"):
                raise KeyError(f"{method} {path}")
            return self.state()

    def state(self) -> dict[str, Any]:
        return {"action": self.action, "rebalance": self.rebalance, "lifecycle": self.lifecycle,
                "token_requests": list(self.token_requests), "unauthorised": self.unauthorised,
                "imdsv1": self.imdsv1, "fault": self.fault, "fault_count": self.fault_count}

    def close(self) -> None:
        pass


def _number(data: dict[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number, got {value!r}")
    return float(value)
