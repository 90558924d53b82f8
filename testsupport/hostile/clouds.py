"""Hostile answers for the AWS and GCP metadata paths (served verbatim through the simulators' /simulate/raw)."""

from __future__ import annotations

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # json.loads raises RecursionError, not ValueError
HUGE_JSON = '{"action": "terminate", "time": "2026-12-03T18:02:00Z", "pad": "' + "x" * 1_000_000 + '"}'

# (cloud, path under the cloud's metadata root, body): each must be a failed poll, never a notice.
GARBAGE_ANSWERS = [
    ("aws", "spot/instance-action", '{"action": "terminate", "time": '),
    ("aws", "spot/instance-action", DEEP_JSON),
    ("aws", "spot/instance-action", HUGE_JSON),
    ("aws", "spot/instance-action", '{"action": "terminate", "time": "soon"}'),
    ("aws", "spot/instance-action", '["terminate"]'),
    ("aws", "events/recommendations/rebalance", '{"noticeTime": 1796329311}'),
    ("aws", "autoscaling/target-lifecycle-state", "\x00\x01Terminated\xff<html>"),
    ("gcp", "preempted", "true, probably"),
    ("gcp", "preempted", DEEP_JSON),
    ("gcp", "maintenance-event", "<html><body>502 Bad Gateway</body></html>"),
]
