"""Hostile JSON texts for the attack suite: what a broken or malicious peer could send where the package
expects JSON (metadata documents, price answers, cache and checkpoint files, control lines, notes)."""

from __future__ import annotations

import json

DEEP = 100_000  # far past any recursion limit


def deep_array(depth: int = DEEP) -> str:
    return "[" * depth + "]" * depth


def deep_object(depth: int = DEEP) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def huge_string(size: int = 8 * 1024 * 1024) -> str:
    return json.dumps("x" * size)


# Values no field of ours should ever accept, as raw JSON text: every one must fail alone, in one line.
HOSTILE_VALUES: dict[str, str] = {
    "deep-array": deep_array(),
    "deep-object": deep_object(),
    "nan": "NaN",
    "infinity": "Infinity",
    "minus-infinity": "-Infinity",
    "huge-number": "1" + "0" * 5000,
    "wrong-type-object": '{"nested": true}',
    "wrong-type-number": "12",
    "wrong-type-bool": "true",
    "null": "null",
}
# Texts that are not JSON at all: inside a document they break the whole document (no reader can tell
# where the bad part ends), so they are tried as whole documents only.
BROKEN_TEXTS: dict[str, str] = {
    "deep-unclosed": "[" * DEEP,
    "truncated": '{"a": [1, 2',
    "not-utf8": "\udcff",
}


def event_text(event_id: str, resources: list[str], *, event_type: str = "Preempt", **raw_fields: str) -> str:
    """A Scheduled Events item as text; `raw_fields` replace or add fields with raw JSON text."""
    fields = {
        "EventId": json.dumps(event_id),
        "EventStatus": '"Scheduled"',
        "EventType": json.dumps(event_type),
        "ResourceType": '"VirtualMachine"',
        "Resources": json.dumps(resources),
        "NotBefore": '"Mon, 19 Sep 2039 18:29:47 GMT"',
        "Description": '""',
        "EventSource": '"Platform"',
        "DurationInSeconds": "-1",
    }
    fields.update(raw_fields)
    return "{" + ", ".join(f"{json.dumps(key)}: {value}" for key, value in fields.items()) + "}"


def events_document(*event_texts: str, incarnation: int = 7) -> str:
    return f'{{"DocumentIncarnation": {incarnation}, "Events": [{", ".join(event_texts)}]}}'
