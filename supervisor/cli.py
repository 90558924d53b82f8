"""The `spot-supervisor` command: run, plan, simulate, enqueue."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from azure.core.exceptions import AzureError

from supervisor import imds_simulator
from worker.handler import HandlerImportError
from worker.logs import is_journal_stream, setup_logging
from worker.process import EX_CONFIG
from worker.queue_client import describe
from worker.settings import ConfigError, Settings, load_settings

log = logging.getLogger("supervisor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spot-supervisor",
                                     description="Run queue work on Spot VMs: size to the VM, drain on eviction, lose nothing.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the service: supervise workers, watch Scheduled Events (foreground, systemd Type=notify)")
    run.add_argument("--config", help="TOML settings file; SPOT_<SECTION>_<KEY> variables override it")

    plan = sub.add_parser("plan", help="print the sizing decision for this VM and exit")
    plan.add_argument("--config")
    plan.add_argument("--json", action="store_true", help="machine-readable output")

    simulate = sub.add_parser("simulate", help="a local Azure IMDS simulator (Scheduled Events, instance metadata)")
    imds_simulator.add_arguments(simulate)

    enqueue = sub.add_parser("enqueue", help="put generated test messages, or the lines of a file, on the queue")
    enqueue.add_argument("--config")
    what = enqueue.add_mutually_exclusive_group(required=True)
    what.add_argument("--count", type=int, help="generate this many sample-handler messages")
    what.add_argument("--file", help="one message per non-empty line ('-' for standard input)")
    enqueue.add_argument("--chunks", type=int, default=5, help="sample handler: chunks per message (default 5)")
    enqueue.add_argument("--chunk-ms", type=float, default=10.0, help="sample handler: CPU ms per chunk (default 10)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        setup_logging("INFO", "imds-simulator")
        return imds_simulator.run(args)
    try:
        settings = load_settings(args.config, require_queue=args.command != "plan")
        setup_logging(settings.telemetry.log_level, "supervisor")
        if args.command == "run":
            from supervisor.build_info import describe_build
            from supervisor.service import run_service

            log.info("%s starting (python %s, config %s)", describe_build(), sys.version.split()[0], args.config or "defaults")
            return run_service(args.config)
        if args.command == "plan":
            return print_plan(settings, args.json)
        from supervisor.enqueue import EnqueueError, run_enqueue

        try:
            return run_enqueue(settings.queue, args.count, args.file, args.chunks, args.chunk_ms)
        except (EnqueueError, OSError, AzureError) as exc:
            print(f"enqueue: {describe(exc) if isinstance(exc, AzureError) else exc}", file=sys.stderr)
            return 1
    except (ConfigError, HandlerImportError) as exc:
        # <3>: an error in the journal. One write, so the prefix and its line cannot arrive apart.
        sys.stderr.write(f"{'<3>' if is_journal_stream(sys.stderr) else ''}{exc}\n")
        sys.stderr.flush()
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception:  # a bug, not bad input: the traceback goes to the journal, systemd restarts us
        log.exception("spot-supervisor %s failed unexpectedly", args.command)
        return 1


def print_plan(settings: Settings, as_json: bool) -> int:
    from supervisor.service import make_plan, read_vm_facts
    from supervisor.sizing import format_plan

    facts = read_vm_facts(settings)
    plan = make_plan(settings, facts)
    if as_json:
        print(json.dumps({**plan.to_dict(), "vm_name": facts.vm_name or None}))
    else:
        print(format_plan(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
