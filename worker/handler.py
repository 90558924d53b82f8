"""Resolving the workload to a handler: `package.module:function`, or `[workload] command`.

A handler may define optional hooks, called by the worker when they exist:
`on_abandon()` at the drain deadline, before held messages are given back (stop
every run, keeping its last checkpoint), and `close()` once as the worker exits.
ProgramHandler defines both.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from worker.common.text import one_line
from worker.settings import WorkloadSettings
from worker.workload_errors import HandlerImportError

Handler = Callable[..., Any]


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


def load_workload(workload: WorkloadSettings) -> Handler:
    """The handler to call per message: a program when workload.command is set (workload.handler is then
    ignored), else the Python callable. Raises WorkloadError when it cannot run."""
    if workload.command:
        from worker.programs.runner import ProgramHandler  # here: `plan` (describe_workload) loads no queue code

        return ProgramHandler.from_settings(workload)
    return load_handler(workload.handler)


def call_hook(handler: Handler, name: str) -> None:
    """Call the handler's optional hook `name` (see the module's docstring), if it has one."""
    hook = getattr(handler, name, None)
    if callable(hook):
        hook()


def describe_workload(workload: WorkloadSettings) -> str:
    """What runs per message, for `plan` and the start-up log."""
    return f"program {workload.command}" if workload.command else f"handler {workload.handler}"
