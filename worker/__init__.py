"""The per-process queue consumer and the handler API.

    def handle(message: worker.Message, ctx: worker.Context) -> None: ...
"""

from worker.context import Context
from worker.message import CheckpointTooLarge, Interrupted, Message

__all__ = ["CheckpointTooLarge", "Context", "Interrupted", "Message"]
