"""JSON from outside, decoded so that no document can do more than fail with one line.

`json.loads` recurses once per nesting level (thousands of brackets raise
RecursionError, which is not a ValueError), accepts NaN and Infinity, and reads
whatever size it is given. Every parser of text the package did not write itself
(metadata documents, price answers and caches, checkpoint files, control lines,
poison notes) goes through `loads`: a size limit, a depth limit checked by a scan
without recursion before decoding, and one error type (`JsonError`, a ValueError)
whose message is one short line.

`object_members` and `array_items` split a document into the texts of its parts
without decoding them, so a caller can decode each part on its own and lose only
the part that is bad (one hostile event in a Scheduled Events document).
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_DEPTH = 32
MAX_BYTES = 1024 * 1024

# A string token (escapes included), or one structural character. Strings are skipped whole by the
# regular expression (C speed); Python only loops over brackets, commas and colons.
_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},:]', re.DOTALL)


class JsonError(ValueError):
    """The text is not JSON this package accepts; str() is one short line."""


def loads(raw: bytes | str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH, allow_nan: bool = False) -> Any:
    """The decoded value, or JsonError: too large, not UTF-8, nested deeper than `max_depth`,
    not JSON, or (unless allow_nan) NaN/Infinity."""
    text = as_text(raw, max_bytes)
    depth = nesting_depth(text, stop_after=max_depth)
    if depth > max_depth:
        raise JsonError(f"nests deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=None if allow_nan else _no_constant)
    except RecursionError:  # not reachable after the scan; kept so that no path can raise it
        raise JsonError(f"nests deeper than {max_depth} levels") from None
    except ValueError as exc:
        raise JsonError(_describe(exc)) from None


def as_text(raw: bytes | str, max_bytes: int = MAX_BYTES) -> str:
    """`raw` as text, at most `max_bytes` bytes of UTF-8; else JsonError."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise JsonError(f"{size} bytes, over the limit of {max_bytes}")
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8-sig") if raw.startswith(b"\xef\xbb\xbf") else raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonError(f"not UTF-8 ({exc.reason} at byte {exc.start})") from None


def nesting_depth(text: str, stop_after: int | None = None) -> int:
    """How deeply arrays and objects nest in `text` (a scalar is 0), without recursion. Stops counting
    once past `stop_after`. Text that is not JSON gets an estimate that is never lower than what
    json.loads would walk into before failing."""
    depth = deepest = 0
    for match in _TOKEN.finditer(text):
        char = match.group()[0]
        if char in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if stop_after is not None and deepest > stop_after:
                    return deepest
        elif char in "]}":
            depth -= 1
            if depth < 0:  # json.loads fails here, before any deeper level
                return deepest
    return deepest


def object_members(text: str) -> dict[str, str]:
    """{key: the undecoded text of its value} of a JSON object (the last of a repeated key, as
    json.loads does); JsonError when `text` is not an object. The values are not checked."""
    members: dict[str, str] = {}
    for part in _parts(text, "{", "}"):
        key_match = _TOKEN.match(part)
        if key_match is None or key_match.group()[0] != '"':
            raise JsonError("an object member has no string key")
        rest = part[key_match.end():].lstrip()
        if not rest.startswith(":"):
            raise JsonError("an object member has no ':'")
        members[loads(key_match.group(), max_depth=0)] = rest[1:].strip()
    return members


def array_items(text: str) -> list[str]:
    """The undecoded texts of a JSON array's items; JsonError when `text` is not an array."""
    return _parts(text, "[", "]")


def _parts(text: str, opening: str, closing: str) -> list[str]:
    """The texts between the top-level commas of one object or array."""
    body = text.strip()
    kind = "an object" if opening == "{" else "an array"
    if not body.startswith(opening):
        raise JsonError(f"expected {kind}")
    parts: list[str] = []
    depth = 0
    start = 1
    for match in _TOKEN.finditer(body):
        char = match.group()[0]
        if char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth == 0:
                if match.group() != closing:
                    raise JsonError(f"{kind} closed by {match.group()!r}")
                if body[match.end():].strip():
                    raise JsonError(f"text after the end of {kind}")
                last = body[start:match.start()].strip()
                if last:
                    parts.append(last)
                elif parts:
                    raise JsonError(f"{kind} ends with ','")
                return parts
        elif char == "," and depth == 1:
            part = body[start:match.start()].strip()
            if not part:
                raise JsonError(f"{kind} has an empty item")
            parts.append(part)
            start = match.end()
    raise JsonError(f"{kind} that never ends")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _describe(exc: ValueError) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 120 else text[:119] + "…"
