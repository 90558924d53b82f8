"""Settings and instance metadata → the sizing plan (`plan` and `run`; imports no consumer code)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from supervisor.config import SupervisorSettings
from supervisor.vm.gpus import Gpu, discover_gpus
from supervisor.vm.imds import ImdsError, InstanceInfo
from supervisor.vm.platform import SourceChoice, choose_source
from supervisor.vm.sizing import Plan, compute_plan, read_resources

log = logging.getLogger(__name__)

INSTANCE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class VmFacts:
    instance: InstanceInfo | None
    vm_name: str
    gpus: tuple[Gpu, ...] = ()
    gpu_note: str | None = None
    events: SourceChoice = SourceChoice("none", "not chosen", "")

    @property
    def vm_size(self) -> str | None:
        return self.instance.vm_size if self.instance else None


def read_vm_facts(settings: SupervisorSettings, warn: bool = True) -> VmFacts:
    """The chosen notice source and its cloud's instance facts; unavailable → one warning, carry on."""
    from supervisor.events.sources import open_source

    instance = None
    choice = choose_source(settings.events)
    if warn:
        log.info("events source: %s%s", choice.describe(),
                 ": no interruption notices watched (SIGTERM still drains)" if choice.source == "none" else "")
    source = open_source(choice, settings)
    if source is not None:
        try:
            instance = source.instance_info(INSTANCE_TIMEOUT_S)
        except ImdsError as exc:
            if warn:
                log.warning("instance metadata unavailable at %s (%s): sizing without the VM size; "
                            "set events.source = \"none\" when not on %s", choice.endpoint, exc, choice.source)
        finally:
            source.close()
    # Once: GPUs do not come and go, a SIGHUP re-plans with the same ones.
    gpus = discover_gpus(visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
    if gpus.warning and warn:
        log.warning("%s", gpus.warning)
    elif gpus.gpus:
        log.debug("%d GPU(s) found by %s", len(gpus.gpus), gpus.source)
    return VmFacts(instance, settings.events.vm_name or (instance.name if instance else ""), gpus.gpus, gpus.note, choice)


def make_plan(settings: SupervisorSettings, facts: VmFacts) -> Plan:
    return compute_plan(settings.scaling, settings.workload.mode, read_resources(), facts.vm_size, facts.gpus,
                        facts.gpu_note)
