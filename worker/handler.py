"""Resolving `package.module:function` to the user's handler."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from worker.text import one_line

Handler = Callable[..., Any]


class HandlerImportError(Exception):
    """The configured handler cannot be imported; str() is one line for the operator."""


def load_handler(ref: str) -> Handler:
    module_name, _, attr_path = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except SystemExit as exc:  # sys.exit() at import: a crash loop if it escaped, so a configuration problem too
        raise HandlerImportError(f"workload.handler: module {module_name!r} called sys.exit({exc.code!r}) while being imported") from None
    except Exception as exc:  # any error while importing user code is a configuration problem
        raise HandlerImportError(f"workload.handler: cannot import module {module_name!r}: {type(exc).__name__}: {one_line(exc)}") from exc
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(f"workload.handler: module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise HandlerImportError(f"workload.handler: {ref!r} is not callable")
    return target
