"""The `spot-supervisor` command: run, plan, simulate, prices, enqueue, poison, fleet."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable

from supervisor.cli_failure import report_failure
from supervisor.config import SupervisorSettings, load_supervisor_settings, unknown_env_variables
from supervisor.fleet import cli as fleet_cli
from supervisor.ops import poison_cli
from worker.handler import describe_workload
from worker.settings import ConfigError
from worker.telemetry.logs import is_journal_stream, setup_logging
from worker.workload_errors import WorkloadError

log = logging.getLogger("supervisor")

SIMULATOR_PORT = 8169


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spot-supervisor",
                                     description="Run queue work on Spot VMs: size to the VM, drain on eviction, lose nothing.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the service: supervise workers, watch Scheduled Events (foreground, systemd Type=notify)")
    run.add_argument("--config", help="TOML settings file; SPOT_<SECTION>_<KEY> variables override it")

    plan = sub.add_parser("plan", help="print the sizing decision for this VM and exit")
    plan.add_argument("--config")
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    simulate = sub.add_parser("simulate", help="a local metadata simulator: Azure IMDS, EC2 IMDSv2 or GCE metadata")
    simulate.add_argument("--cloud", default="azure", choices=("azure", "aws", "gcp"),
                          help="whose metadata service to serve (default: %(default)s)")
    simulate.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    simulate.add_argument("--port", type=int, default=SIMULATOR_PORT, help="port to listen on (default: %(default)s)")
    simulate.add_argument("--vm-name", default=None, help="the instance's name (default: vm-spot-07 on Azure, "
                          "i-0abc1234def567890 on AWS, spot-render-07 on GCP)")
    simulate.add_argument("--vm-size", default=None, help="its size (default: Standard_D2s_v3, m5.large, n2-standard-4)")
    simulate.add_argument("--priority", default="Spot", choices=("Spot", "Regular", "Low"),
                          help="Spot or not (default: %(default)s; AWS serves spot/on-demand, GCP preemptible TRUE/FALSE)")
    simulate.add_argument("--evict-after", type=float, default=None, metavar="S",
                          help="post a Preempt for this VM S seconds after start")
    simulate.add_argument("--notice", type=float, default=None, metavar="S",
                          help="seconds between an eviction appearing and its NotBefore/time (default: 30; AWS 120)")

    prices = sub.add_parser("prices", help="this VM's Linux Spot and pay-as-you-go hourly prices and the savings "
                                           "(Azure Retail Prices API, cached for a day)")
    prices.add_argument("--config")
    prices.add_argument("--sku", help="VM size, e.g. Standard_D4s_v5 (default: this VM's, from instance metadata)")
    prices.add_argument("--region", help="Azure region, e.g. westeurope (default: this VM's)")
    prices.add_argument("--json", action="store_true", help="machine-readable output")

    enqueue = sub.add_parser("enqueue", help="put generated test messages, or the lines of a file, on the queue")
    enqueue.add_argument("--config")
    what = enqueue.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", type=at_least(1, int), help="generate this many sample-handler messages")
    what.add_argument("--file", help="one message per line that is not blank ('-' for standard input)")
    enqueue.add_argument("--chunks", type=at_least(1, int), default=5, help="sample handler: chunks per message (default 5)")
    enqueue.add_argument("--chunk-ms", type=at_least(0, float), default=10.0, help="sample handler: CPU ms per chunk (default 10)")

    poison = sub.add_parser("poison", help="inspect and replay <queue>-poison: list, requeue, purge")
    poison_cli.add_arguments(poison)

    fleet = sub.add_parser("fleet", help="the fleet keeper (one per fleet): run, plan, status")
    fleet_cli.add_arguments(fleet)
    return parser


def at_least(low: float, kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number (int or float) of at least `low`, else a usage error naming the value."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {text!r}") from None
        if not math.isfinite(value) or value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low:g}, got {text}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "poison":
        poison_cli.check_arguments(parser, args)
    if args.command == "simulate":  # a development tool: `run` never loads it
        from supervisor.simulator import cli as simulator_cli

        setup_logging("INFO", "imds-simulator")
        return simulator_cli.run(args)
    try:
        settings = load_supervisor_settings(args.config, require_queue=args.command not in ("plan", "prices"))
        if args.command == "fleet":
            setup_logging(settings.telemetry.log_level, "fleet-keeper")
            return fleet_cli.run(args, settings)
        setup_logging(settings.telemetry.log_level, "supervisor")
        if args.command in ("run", "plan"):
            for warning in unknown_env_variables(SupervisorSettings):
                log.warning("%s", warning)
        if args.command == "run":
            from supervisor.service import run_service

            return run_service(settings, args.config)
        if args.command == "plan":
            return print_plan(settings, args.json)
        if args.command == "prices":
            return print_prices(settings, args.sku, args.region, args.json)
        if args.command == "poison":
            return poison_cli.run(args, settings.queue)
        return enqueue_command(settings, args)
    except (ConfigError, WorkloadError) as exc:
        # <3>: an error in the journal. One write, so the prefix and its line cannot arrive apart.
        sys.stderr.write(f"{'<3>' if is_journal_stream(sys.stderr) else ''}{exc}\n")
        sys.stderr.flush()
        return os.EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug, not bad input: the traceback goes to the journal, systemd restarts us
        log.exception("spot-supervisor %s failed unexpectedly", args.command)
        return 1


def enqueue_command(settings: SupervisorSettings, args: argparse.Namespace) -> int:
    from azure.core.exceptions import AzureError

    from supervisor.ops.enqueue import EnqueueError, run_enqueue

    try:
        return run_enqueue(settings.queue, args.count, args.file, args.chunks, args.chunk_ms)
    except (EnqueueError, OSError, AzureError) as exc:
        return report_failure("enqueue", exc)


def print_prices(settings: SupervisorSettings, sku: str | None, region: str | None, as_json: bool) -> int:
    from supervisor.ops.prices import PricesError, get_quote
    from supervisor.vm.imds import ImdsError, fetch_instance_info
    from supervisor.vm.planning import INSTANCE_TIMEOUT_S
    from supervisor.vm.platform import choose_source

    if not (sku and region):
        choice = choose_source(settings.events)
        if choice.source in ("aws", "gcp"):
            return report_failure("prices", f"not available on {choice.source.upper()} (Azure Retail Prices only); "
                                  "give --sku and --region of an Azure VM size")
        if choice.source != "azure":
            return report_failure("prices", f"give --sku and --region (events source is \"{choice.source}\": "
                                  "no instance metadata to ask)")
        try:
            instance = fetch_instance_info(choice.endpoint, INSTANCE_TIMEOUT_S)
        except ImdsError as exc:
            return report_failure("prices", f"this VM's size and region are unknown ({exc}); give --sku and --region")
        sku, region = sku or instance.vm_size, region or instance.location
    try:
        quote, cached = get_quote(settings.cost.prices_endpoint, sku, region)
    except PricesError as exc:
        return report_failure("prices", exc)
    if as_json:
        print(json.dumps({**quote.to_dict(), "cached": cached}))
    else:
        print(quote.describe() + (" (cached today)" if cached else ""))
    return 0


def print_plan(settings: SupervisorSettings, as_json: bool) -> int:
    from supervisor.vm.planning import make_plan, read_vm_facts
    from supervisor.vm.sizing import format_plan

    facts = read_vm_facts(settings)
    plan = make_plan(settings, facts)
    workload = settings.workload
    if as_json:  # exactly one of handler and command is set: the one that runs
        print(json.dumps({**plan.to_dict(), "vm_name": facts.vm_name or None, "events_source": facts.events.source,
                          "events_source_why": facts.events.why,
                          "handler": None if workload.command else workload.handler, "command": workload.command or None}))
    else:
        print(f"runs:     {describe_workload(workload)}")
        print(format_plan(plan))
        print(f"events:   {facts.events.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
