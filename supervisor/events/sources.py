"""One notice source per cloud, behind the `EventSource` seam: the chosen one, opened."""

from __future__ import annotations

from typing import Protocol

from supervisor.config import SupervisorSettings
from supervisor.events.aws import AwsInstanceMetadata
from supervisor.events.azure import AzureScheduledEvents, EventsDocument
from supervisor.events.gcp import GcpMetadata
from supervisor.vm.imds import InstanceInfo
from supervisor.vm.platform import SourceChoice


class EventSource(Protocol):
    """Where eviction notices come from: Azure in events/azure.py, AWS in events/aws.py, Google Cloud in events/gcp.py."""

    name: str  # for the log: "Azure Scheduled Events"
    acknowledges: bool  # False: the cloud has no acknowledgement, nothing is ever POSTed

    def poll(self) -> EventsDocument:
        """The current document; raises ImdsError on any failure."""
        ...

    def acknowledge(self, event_id: str) -> None:
        """Approve the event so it starts now; raises ImdsError on failure."""
        ...

    def next_poll_in(self, interval_s: float) -> float:
        """Seconds to wait after a successful poll (0 when the poll itself waited for a change)."""
        ...

    def instance_info(self, timeout_s: float | None = None) -> InstanceInfo:
        """This machine's name, size, region and priority; raises ImdsError on failure."""
        ...

    def close(self) -> None:
        ...


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
