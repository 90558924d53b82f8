"""`spot-supervisor run` and `plan`: settings → VM facts → plan → arbiter."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from supervisor import sdnotify
from supervisor.arbiter import Arbiter
from supervisor.eviction import Decision, EvictionPolicy
from supervisor.imds import ImdsError, InstanceInfo, fetch_instance_info
from supervisor.scheduled_events import AzureScheduledEvents, Backoff, EventWatcher
from supervisor.sizing import Plan, compute_plan, read_resources
from worker.handler import describe_workload
from worker.program import resolve_command
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


class EventsThread(threading.Thread):
    """Learns this VM's name if IMDS was not ready at start, then watches Scheduled Events."""

    def __init__(self, settings: Settings, vm_name: str, submit: Callable[[Decision], None]) -> None:
        super().__init__(name="imds", daemon=True)
        self.settings = settings
        self.vm_name = vm_name
        self.submit = submit
        self.source = AzureScheduledEvents(settings.events.endpoint, settings.events.request_timeout_s)
        self.stopping = threading.Event()
        self.watcher: EventWatcher | None = None

    def run(self) -> None:
        backoff = Backoff(base_s=1.0, cap_s=30.0)
        while not self.vm_name and not self.stopping.is_set():
            self.stopping.wait(backoff.next_delay())
            try:
                self.vm_name = fetch_instance_info(self.settings.events.endpoint, INSTANCE_TIMEOUT_S).name
                log.info("instance metadata answered: this VM is %s", self.vm_name)
            except ImdsError as exc:
                log.debug("instance metadata still unavailable: %s", exc)
        if self.stopping.is_set():
            return
        policy = EvictionPolicy(self.vm_name, self.settings.events)
        self.watcher = EventWatcher(self.source, policy, self.submit, poll_interval_s=self.settings.events.poll_interval_s)
        log.info("watching Scheduled Events at %s for %s (drain on %s)", self.settings.events.endpoint,
                 self.vm_name, ", ".join(self.settings.events.drain_on))
        self.watcher.run()  # on this thread

    def acknowledge(self, event_id: str) -> None:
        self.source.acknowledge(event_id)

    def stop(self) -> None:
        self.stopping.set()
        if self.watcher is not None:
            self.watcher.stop(timeout_s=0)
        self.source.close()


def run_service(config_path: str | None) -> int:
    settings = load_settings(config_path)
    if settings.workload.command:
        resolve_command(settings.workload.command)  # a missing program: exit 78 now, not a retry storm per message
    facts = read_vm_facts(settings)
    if facts.instance is not None:
        i = facts.instance
        log.info("this VM: %s, %s, priority %s%s", i.name, i.vm_size, i.priority,
                 f", eviction policy {i.eviction_policy}" if i.eviction_policy else "")
    plan = make_plan(settings, facts)
    for reason in plan.reasons:
        log.info("plan: %s", reason)
    log.info("workload: %s", describe_workload(settings.workload))
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

    events: EventsThread | None = None
    arbiter = Arbiter(settings, plan, telemetry, attributes, reload=reload)
    if settings.events.source == "azure":
        events = EventsThread(settings, facts.vm_name, arbiter.submit)
        arbiter.acknowledge_event = events.acknowledge
    try:
        if events is not None:
            events.start()
        return arbiter.run()
    finally:
        if events is not None:
            events.stop()
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
