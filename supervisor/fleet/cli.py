"""`spot-supervisor fleet run [--once] | plan [--json] | status [--json]`.

supervisor/cli.py declares the subcommand and calls `run` here only for `fleet`, so the per-VM
service never imports this package's Azure parts.
"""

from __future__ import annotations

import argparse
import json
import logging

from supervisor.config import SupervisorSettings
from supervisor.fleet.settings import validate_fleet

log = logging.getLogger("supervisor.fleet")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    verbs = parser.add_subparsers(dest="fleet_command", required=True)
    run = verbs.add_parser("run", help="keep the scale sets at the size the queue needs (foreground, systemd Type=notify)")
    run.add_argument("--config", help="TOML settings file; SPOT_<SECTION>_<KEY> variables override it")
    run.add_argument("--once", action="store_true", help="one reconcile pass, then exit 0 (for a timer, a job or cron)")
    for name, text in (("plan", "what one pass would do now, and why (changes nothing)"),
                       ("status", "the fleet's state as a table (changes nothing)")):
        verb = verbs.add_parser(name, help=text)
        verb.add_argument("--config", help="TOML settings file; SPOT_<SECTION>_<KEY> variables override it")
        verb.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace, settings: SupervisorSettings) -> int:
    validate_fleet(settings.fleet, require_scale_sets=True)
    from supervisor.fleet.arm import FleetArm, make_credential
    from supervisor.fleet.keeper import Keeper, run_keeper

    arm = FleetArm(settings.fleet.arm_endpoint, make_credential(settings.fleet.client_id), settings.fleet.request_timeout_s)
    if args.fleet_command == "run":
        return run_keeper(settings, arm, args.once, metrics_factory=lambda: _metrics(settings))
    from supervisor.fleet.report import format_status, plan_document

    plan, inbox = Keeper(settings, arm).look()
    if args.json:
        print(json.dumps(plan_document(plan, inbox)))
    else:
        print(format_status(plan, inbox))
    return 0


def _metrics(settings: SupervisorSettings) -> object:
    from supervisor.fleet.metrics import FleetMetrics
    from worker.telemetry.providers import setup_telemetry

    telemetry = setup_telemetry(settings.telemetry, "fleet-keeper")
    return FleetMetrics(telemetry.meter)
