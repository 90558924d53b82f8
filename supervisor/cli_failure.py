"""How a CLI command that failed for an outside reason says so: one line on stderr, exit 1."""

from __future__ import annotations

import sys


def report_failure(command: str, problem: Exception | str) -> int:
    """Print `<command>: <problem>` on stderr (an Azure SDK error in one line, without its multi-line
    detail); return 1, the exit status for anything that is not a configuration error."""
    if isinstance(problem, Exception):
        from azure.core.exceptions import AzureError  # only once something failed: other commands never load it

        from worker.queue.client import describe

        if isinstance(problem, AzureError):
            problem = describe(problem)
    print(f"{command}: {problem}", file=sys.stderr)
    return 1
