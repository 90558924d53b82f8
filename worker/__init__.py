"""The per-process queue consumer and the handler API.

    def handle(message: worker.Message, ctx: worker.Context) -> None: ...
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.context import Context
    from worker.message import CheckpointTooLarge, Interrupted, Message

__all__ = ["CheckpointTooLarge", "Context", "Interrupted", "Message"]

# Resolved on first use, so that `import worker.settings` (the supervisor's `plan`, say) does not
# load the queue client and the consumer stack behind worker.context.
_HOMES = {"Context": "worker.context", "CheckpointTooLarge": "worker.message", "Interrupted": "worker.message",
          "Message": "worker.message"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'worker' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
