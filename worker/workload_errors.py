"""Why the configured workload cannot run: a configuration problem (exit 78), one line for the operator."""

from __future__ import annotations


class WorkloadError(Exception):
    """The configured workload cannot run; str() is one line for the operator."""


class HandlerImportError(WorkloadError):
    """workload.handler cannot be imported, or is not a callable."""


class CommandError(WorkloadError):
    """workload.command cannot be run (no such executable, or not executable)."""
