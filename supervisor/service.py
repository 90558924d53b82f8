"""`spot-supervisor run`: settings → VM facts → plan → arbiter (`plan` itself is cli.print_plan)."""

from __future__ import annotations

import logging
import sys

from supervisor import sdnotify
from supervisor.build_info import describe_build
from supervisor.config import SupervisorSettings, load_supervisor_settings
from supervisor.events.sources import EventSource, open_source
from supervisor.events.watcher import EventWatcher
from supervisor.ops.cost import CostTracker
from supervisor.pool.arbiter import Arbiter
from supervisor.pool.retirement import Retirement
from supervisor.vm.planning import VmFacts, make_plan, read_vm_facts
from supervisor.vm.sizing import Plan
from worker.common.secrets import protect_secrets
from worker.handler import describe_workload
from worker.programs.command import resolve_command
from worker.telemetry.providers import setup_telemetry

log = logging.getLogger(__name__)

def run_service(settings: SupervisorSettings, config_path: str | None) -> int:
    """The service, with the settings `main` loaded (config_path is read again on SIGHUP)."""
    if settings.workload.command:
        resolve_command(settings.workload.command)  # a missing program: exit 78 now, not a retry storm per message
    # The settings are read: from now on no process of the same uid (a program a worker runs) can read the
    # secrets in this process's environment block or memory, nor in its workers' (forked: they inherit both).
    protect_secrets()
    # After the checks that exit 78: a configuration error stays the only line.
    log.info("%s starting (python %s, config %s)", describe_build(), sys.version.split()[0], config_path or "defaults")
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
        from supervisor.vm.provisioning import ProvisioningTimeout

        try:
            wait_until_provisioned(settings, facts)
        except ProvisioningTimeout as exc:  # exit 1, not 78: systemd restarts the unit and the gate tries again
            log.error("%s", exc)
            return 1
    attributes = {"spot.vm.name": facts.vm_name, "spot.vm.size": facts.vm_size or ""}
    telemetry = setup_telemetry(settings.telemetry, "supervisor", attributes)

    def reload() -> tuple[SupervisorSettings, Plan]:
        new_settings = load_supervisor_settings(config_path)
        return new_settings, make_plan(new_settings, facts)

    source: EventSource | None = open_source(facts.events, settings, facts.vm_name)
    events: EventWatcher | None = None
    if source is not None:
        events = EventWatcher(source, settings.events, facts.vm_name)
    cost = CostTracker(settings.cost.prices_endpoint, is_spot=facts.instance is None or facts.instance.is_spot)
    arbiter = Arbiter(settings, plan, telemetry, attributes, reload=reload, events=events,
                      exit_summary=lambda totals: cost.summary(totals.get("succeeded", 0)),
                      retirement=make_retirement(settings, facts))
    if settings.cost.enabled:
        arbiter.metrics.observe_cost(cost, lambda: arbiter.totals().get("succeeded", 0))
        if facts.events.source in ("aws", "gcp"):
            log.info("cost: prices are not available on %s (the Retail Prices API is Azure's): no prices this run",
                     facts.events.source.upper())
        elif facts.instance is not None:
            cost.fetch_in_background(facts.instance.vm_size, facts.instance.location)
        else:
            log.info("cost: no VM size and region without instance metadata: no prices this run "
                     "(spot-supervisor prices --sku S --region R works anywhere)")
    try:
        return arbiter.run()
    finally:
        if events is not None:
            events.stop(timeout_s=0)
        if source is not None:
            source.close()
        telemetry.shutdown()


def make_retirement(settings: SupervisorSettings, facts: VmFacts) -> Retirement | None:
    if settings.fleet.retire_when_idle_s <= 0:
        return None
    if facts.instance is None or not facts.instance.resource_id:
        log.warning("fleet.retire_when_idle_s: no resourceId from instance metadata, so this VM cannot ask to retire")
        return None
    return Retirement(settings.fleet.retire_when_idle_s, settings.queue, facts.instance.resource_id, facts.vm_name)


def wait_until_provisioned(settings: SupervisorSettings, facts: VmFacts) -> None:
    from supervisor.vm.provisioning import wait_for_provisioning

    if facts.instance is None or not facts.instance.resource_id:
        log.warning("startup.wait_for_provisioning: no resourceId from instance metadata; starting without the gate")
        return
    log.info("waiting until Azure reports %s provisioned (up to %.0fs)", facts.instance.resource_id,
             settings.startup.provisioning_timeout_s)
    sdnotify.status("waiting for provisioningState Succeeded")
    wait_for_provisioning(facts.instance.resource_id, settings.startup.arm_endpoint, settings.startup.provisioning_timeout_s,
                          client_id=settings.queue.client_id or None)
