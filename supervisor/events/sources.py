"""One notice source per cloud, behind the `EventSource` seam: the chosen one, opened."""

from __future__ import annotations

from supervisor.config import SupervisorSettings
from supervisor.events.aws import AwsInstanceMetadata
from supervisor.events.azure import AzureScheduledEvents, EventSource
from supervisor.events.gcp import GcpMetadata
from supervisor.vm.platform import SourceChoice


def open_source(choice: SourceChoice, settings: SupervisorSettings, vm_name: str = "") -> EventSource | None:
    """The source for `choice` (None for "none"); close() it when done."""
    e = settings.events
    if choice.source == "azure":
        return AzureScheduledEvents(choice.endpoint, e.request_timeout_s)
    if choice.source == "aws":
        # Notices without a time of their own (a scale-in, a rebalance to drain for) get a SIGTERM's deadline.
        return AwsInstanceMetadata(choice.endpoint, e.request_timeout_s, vm_name, on_rebalance=e.on_rebalance,
                                   unannounced_notice_s=settings.shutdown.drain_timeout_s + e.safety_margin_s)
    if choice.source == "gcp":
        return GcpMetadata(choice.endpoint, e.request_timeout_s, vm_name)
    return None
