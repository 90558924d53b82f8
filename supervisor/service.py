"""`spot-supervisor run` and `plan`: settings → VM facts → plan → arbiter."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from supervisor import sdnotify
from supervisor.arbiter import Arbiter
from supervisor.event_watcher import EventWatcher
from supervisor.imds import ImdsError, InstanceInfo, fetch_instance_info
from supervisor.scheduled_events import AzureScheduledEvents
from supervisor.sizing import Plan, compute_plan, read_resources
from worker.settings import Settings, load_settings
from worker.telemetry import setup_telemetry

log = logging.getLogger(__name__)

INSTANCE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class VmFacts:
    instance: InstanceInfo | None
    vm_name: str

    @property
    def vm_size(self) -> str | None:
        return self.instance.vm_size if self.instance else None


def read_vm_facts(settings: Settings, warn: bool = True) -> VmFacts:
    """Instance metadata when watching Azure; not on Azure → one warning, carry on."""
    instance = None
    if settings.events.source == "azure":
        try:
            instance = fetch_instance_info(settings.events.endpoint, INSTANCE_TIMEOUT_S)
        except ImdsError as exc:
            if warn:
                log.warning("instance metadata unavailable at %s (%s): sizing without vmSize; "
                            "set events.source = \"none\" when not on Azure", settings.events.endpoint, exc)
    return VmFacts(instance, settings.events.vm_name or (instance.name if instance else ""))


def make_plan(settings: Settings, facts: VmFacts) -> Plan:
    return compute_plan(settings.scaling, settings.workload.mode, read_resources(), facts.vm_size)


def run_service(config_path: str | None) -> int:
    settings = load_settings(config_path)
    facts = read_vm_facts(settings)
    if facts.instance is not None:
        i = facts.instance
        log.info("this VM: %s, %s, priority %s%s", i.name, i.vm_size, i.priority,
                 f", eviction policy {i.eviction_policy}" if i.eviction_policy else "")
    plan = make_plan(settings, facts)
    for reason in plan.reasons:
        log.info("plan: %s", reason)
    if settings.startup.wait_for_provisioning:
        from supervisor.provisioning import ProvisioningTimeout

        try:
            wait_until_provisioned(settings, facts)
        except ProvisioningTimeout as exc:  # exit 1, not 78: systemd restarts the unit and the gate tries again
            log.error("%s", exc)
            return 1
    attributes = {"spot.vm.name": facts.vm_name, "spot.vm.size": facts.vm_size or ""}
    telemetry = setup_telemetry(settings.telemetry, "supervisor", attributes)

    def reload() -> tuple[Settings, Plan]:
        new_settings = load_settings(config_path)
        return new_settings, make_plan(new_settings, facts)

    source: AzureScheduledEvents | None = None
    events: EventWatcher | None = None
    if settings.events.source == "azure":
        source = AzureScheduledEvents(settings.events.endpoint, settings.events.request_timeout_s)
        events = EventWatcher(source, settings.events, facts.vm_name)
    arbiter = Arbiter(settings, plan, telemetry, attributes, reload=reload, events=events)
    try:
        return arbiter.run()
    finally:
        if events is not None:
            events.stop(timeout_s=0)
        if source is not None:
            source.close()
        telemetry.shutdown()


def wait_until_provisioned(settings: Settings, facts: VmFacts) -> None:
    from supervisor.provisioning import wait_for_provisioning

    if facts.instance is None or not facts.instance.resource_id:
        log.warning("startup.wait_for_provisioning: no resourceId from instance metadata; starting without the gate")
        return
    log.info("waiting until Azure reports %s provisioned (up to %.0fs)", facts.instance.resource_id,
             settings.startup.provisioning_timeout_s)
    sdnotify.status("waiting for provisioningState Succeeded")
    wait_for_provisioning(facts.instance.resource_id, settings.startup.arm_endpoint, settings.startup.provisioning_timeout_s,
                          client_id=settings.queue.client_id or None)
