"""One-line text for operators: log lines, error messages, sd_notify STATUS=."""

from __future__ import annotations


def one_line(value: object) -> str:
    """str(value) with every run of whitespace (newlines included) made one space; an exception
    whose text is empty gives its type name."""
    text = " ".join(str(value).split())
    if not text and isinstance(value, BaseException):
        return type(value).__name__
    return text
