"""`spot-supervisor simulate`: the simulator in the foreground until SIGINT/SIGTERM.

Its arguments are declared with the other commands' in supervisor/cli.py, which
imports this module only for `simulate`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable

from supervisor.simulator.http_base import ServedOnThread
from supervisor.simulator.server import ImdsSimulator

log = logging.getLogger("supervisor.simulator")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    if getattr(args, "cloud", "azure") != "azure":
        return run_other_cloud(args)
    sim = ImdsSimulator(args.host, args.port, vm_name=args.vm_name or "vm-spot-07",
                        vm_size=args.vm_size or "Standard_D2s_v3", priority=args.priority,
                        notice_s=30.0 if args.notice is None else args.notice)

    def announce() -> None:
        print(f"imds simulator listening on {sim.url} (vm {sim.vm_name}, {sim.vm_size}, {sim.priority})", flush=True)
        print(f"  point the supervisor at it: SPOT_EVENTS_ENDPOINT={sim.url}", flush=True)
        if args.evict_after is not None:
            result = sim.simulate_eviction(delay_s=sim.notice_s, after_s=args.evict_after)
            log.info("eviction %s scheduled: appears in %gs, NotBefore %s", result["EventId"],
                     args.evict_after, result["NotBefore"])

    return serve_until_signalled(sim, "imds simulator", announce)


def run_other_cloud(args: argparse.Namespace) -> int:
    """`simulate --cloud aws|gcp`: the same in the foreground, with that cloud's metadata shapes."""
    from supervisor.simulator.aws import AwsMetadata
    from supervisor.simulator.gcp import GcpMetadata
    from supervisor.simulator.metadata_http import MetadataServer

    spot = args.priority != "Regular"
    model: AwsMetadata | GcpMetadata
    if args.cloud == "aws":
        model = AwsMetadata(instance_id=args.vm_name or "i-0abc1234def567890", instance_type=args.vm_size or "m5.large",
                            spot=spot, notice_s=120.0 if args.notice is None else args.notice)
    else:
        model = GcpMetadata(name=args.vm_name or "spot-render-07", machine_type=args.vm_size or "n2-standard-4", spot=spot)
    server = MetadataServer(model, args.host, args.port)

    def announce() -> None:
        print(f"{args.cloud} metadata simulator listening on {server.url}", flush=True)
        print(f"  point the supervisor at it: SPOT_EVENTS_SOURCE={args.cloud} SPOT_EVENTS_ENDPOINT={server.url}", flush=True)
        if args.evict_after is not None:
            result = model.simulate_eviction(after_s=args.evict_after)
            log.info("eviction scheduled in %gs: %s", args.evict_after, result)

    return serve_until_signalled(server, f"{args.cloud} metadata simulator", announce)


def serve_until_signalled(served: ServedOnThread, name: str, announce: Callable[[], None]) -> int:
    """Serve in the foreground until SIGINT or SIGTERM; 1 when the address cannot be had."""
    try:
        served.start()
    except OSError as exc:
        print(f"{name}: cannot listen on {served.host}:{served.port}: {exc.strerror or exc}", flush=True)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announce()
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        served.stop()
    print(f"{name} stopped", flush=True)
    return 0
