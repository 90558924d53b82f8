"""The Compute Engine metadata server as a model, for `simulate --cloud gcp` and the tests.

Shapes as tests/fixtures/gcp/README.md documents them. Metadata paths (403 without
`Metadata-Flavor: Google`; answers carry it and an ETag):
  GET /computeMetadata/v1/instance/<path>[?wait_for_change=true&last_etag=E&timeout_sec=N]
      preempted  maintenance-event  name  machine-type  zone  scheduling/preemptible
A watch answers at once when the value's ETag differs from last_etag, else when it changes,
else after timeout_sec with the value unchanged.
Control (JSON):
  POST   /simulate/eviction     {"after_s": 0}  preempted becomes TRUE           DELETE: FALSE again
  POST   /simulate/maintenance  {"value": "TERMINATE_ON_HOST_MAINTENANCE"}      ({"value": "NONE"} ends it)
  POST   /simulate/raw          {"path": "preempted", "status": 200, "body": "..."}   DELETE: all cleared
  POST   /simulate/faults       {"mode": "503"|"hang"|"garbage"|"no-watch"|"reset", "count": n}
                                (hang: watches never answer; no-watch: watches answer at once, unchanged)
  POST   /simulate/reset        GET /simulate/state   GET /simulate/requests
"""

from __future__ import annotations

import hashlib
import threading
import time
from typing import Any

from supervisor.simulator.metadata_http import Reply
from supervisor.simulator.state import BadRequest

INSTANCE = "/computeMetadata/v1/instance/"
PROJECT = "projects/123456789"
FAULTS = ("503", "hang", "garbage", "no-watch", "reset")
MAX_WATCH_S = 3600.0


class GcpMetadata:
    cloud = "gcp"

    def __init__(self, *, name: str = "spot-render-07", machine_type: str = "n2-standard-4",
                 zone: str = "us-central1-a", spot: bool = True) -> None:
        self.facts = {"name": name, "machine-type": f"{PROJECT}/machineTypes/{machine_type}",
                      "zone": f"{PROJECT}/zones/{zone}", "scheduling/preemptible": "TRUE" if spot else "FALSE"}
        self._changed = threading.Condition()
        self._closed = False
        self._timers: list[threading.Timer] = []
        self._reset()

    def _reset(self) -> None:
        self.values = {"preempted": "FALSE", "maintenance-event": "NONE"}
        self.versions = {"preempted": 0, "maintenance-event": 0}
        self.raw: dict[str, tuple[int, str]] = {}
        self.fault, self.fault_count = "", 0
        self.watches = 0  # wait_for_change requests received

    def etag(self, path: str) -> str:
        value = self.raw.get(path, (0, self.values.get(path, self.facts.get(path, ""))))
        return hashlib.sha256(f"{path}:{self.versions.get(path, 0)}:{value}".encode()).hexdigest()[:16]

    # -- metadata ----------------------------------------------------------------

    def serve(self, method: str, path: str, query: dict[str, str], headers: dict[str, str]) -> Reply:
        if headers.get("metadata-flavor") != "Google":
            return Reply.text(403, "Missing required header: Metadata-Flavor")
        if not path.startswith(INSTANCE) or method != "GET":
            return Reply.text(404 if method == "GET" else 405, "Not Found")
        sub = path[len(INSTANCE):]
        watch = query.get("wait_for_change") == "true"
        with self._changed:
            if watch:
                self.watches += 1
            fault = self._take_fault(watch)
            if fault == "hang":
                return Reply(0, hang=True)
            if fault == "reset":
                return Reply(0, reset=True)
            if fault == "503":
                return Reply.text(503, "Service Unavailable")
            if fault == "garbage":
                return self._answer(sub, 200, "\x00\x01 <html>garbage")
            if watch and fault != "no-watch":
                last = query.get("last_etag")
                timeout = min(float(query.get("timeout_sec", MAX_WATCH_S)), MAX_WATCH_S)
                end = time.monotonic() + timeout
                while last in (None, self.etag(sub)) and not self._closed:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    last = last or self.etag(sub)  # no last_etag: wait for the next change
                    self._changed.wait(left)
            if sub in self.raw:
                return self._answer(sub, *self.raw[sub])
            if sub in self.values:
                return self._answer(sub, 200, self.values[sub])
            if sub in self.facts:
                return self._answer(sub, 200, self.facts[sub])
            return self._answer(sub, 404, "Not Found")

    def _answer(self, sub: str, status: int, text: str) -> Reply:
        return Reply.text(status, text, **{"Metadata-Flavor": "Google", "ETag": self.etag(sub)})

    def _take_fault(self, watch: bool) -> str:
        if self.fault_count <= 0 or (self.fault in ("hang", "no-watch") and not watch):
            return ""
        self.fault_count -= 1
        return self.fault

    # -- control -----------------------------------------------------------------

    def set_value(self, path: str, value: str) -> None:
        with self._changed:
            if self.values.get(path) != value:
                self.values[path] = value
                self.versions[path] += 1
                self._changed.notify_all()

    def simulate_eviction(self, after_s: float = 0.0) -> dict[str, Any]:
        if after_s > 0:
            timer = threading.Timer(after_s, self.set_value, ("preempted", "TRUE"))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()
        else:
            self.set_value("preempted", "TRUE")
        return {"preempted": "TRUE", "at": time.time() + after_s}

    def control(self, method: str, path: str, data: dict[str, Any]) -> Any:
        route = (method, path)
        if route == ("POST", "/simulate/eviction"):
            after = data.get("after_s", 0.0)
            if isinstance(after, bool) or not isinstance(after, (int, float)):
                raise BadRequest(f"after_s must be a number, got {after!r}")
            return self.simulate_eviction(float(after))
        if route == ("DELETE", "/simulate/eviction"):
            self.set_value("preempted", "FALSE")
        elif route == ("POST", "/simulate/maintenance"):
            self.set_value("maintenance-event", str(data.get("value", "TERMINATE_ON_HOST_MAINTENANCE")))
        else:
            with self._changed:
                if route == ("POST", "/simulate/raw"):
                    sub = str(data["path"])
                    self.raw[sub] = (int(data.get("status", 200)), str(data.get("body", "")))
                    self.versions[sub] = self.versions.get(sub, 0) + 1
                elif route == ("DELETE", "/simulate/raw"):
                    for sub in self.raw:
                        self.versions[sub] = self.versions.get(sub, 0) + 1
                    self.raw.clear()
                elif route == ("POST", "/simulate/faults"):
                    mode = str(data.get("mode", ""))
                    if mode not in FAULTS:
                        raise BadRequest(f"mode must be one of {', '.join(FAULTS)}, got {mode!r}")
                    self.fault, self.fault_count = mode, int(data.get("count", 1))
                elif route == ("POST", "/simulate/reset"):
                    self._reset()
                elif route != ("GET", "/simulate/state"):
                    raise KeyError(f"{method} {path}")
                self._changed.notify_all()
        return self.state()

    def state(self) -> dict[str, Any]:
        with self._changed:
            return {**self.values, "watches": self.watches, "fault": self.fault, "fault_count": self.fault_count}

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        for timer in self._timers:
            timer.cancel()
