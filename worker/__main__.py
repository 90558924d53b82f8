"""`python -m worker --config PATH`: one standalone worker process, no supervisor.

Handy for debugging a handler; production runs `spot-supervisor run`.
SIGTERM/SIGINT drain within shutdown.drain_timeout_s, SIGQUIT releases at once.
"""

from __future__ import annotations

import argparse
import os
import sys

from worker.common.secrets import protect_secrets
from worker.process import WorkerProcess
from worker.settings import ConfigError, load_settings
from worker.telemetry.logs import setup_logging
from worker.telemetry.providers import setup_telemetry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="TOML settings file (SPOT_<SECTION>_<KEY> variables override it)")
    parser.add_argument("--threads", type=int, default=1, help="consumer threads (default 1)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return os.EX_CONFIG
    setup_logging(settings.telemetry.log_level, "worker")
    protect_secrets()  # the settings are read: the programs this worker runs cannot read its secrets
    telemetry = setup_telemetry(settings.telemetry, "worker")
    try:
        return WorkerProcess(settings, telemetry, threads=max(1, args.threads)).run()
    finally:
        telemetry.shutdown()


if __name__ == "__main__":
    sys.exit(main())
