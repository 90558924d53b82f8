"""`spot-supervisor simulate`: the simulator in the foreground until SIGINT/SIGTERM.

Its arguments are declared with the other commands' in supervisor/cli.py, which
imports this module only for `simulate`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from supervisor.simulator.server import ImdsSimulator

log = logging.getLogger("supervisor.simulator")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    sim = ImdsSimulator(args.host, args.port, vm_name=args.vm_name, vm_size=args.vm_size,
                        priority=args.priority, notice_s=args.notice)
    try:
        sim.start()
    except OSError as exc:
        print(f"imds simulator: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", flush=True)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(f"imds simulator listening on {sim.url} (vm {sim.vm_name}, {sim.vm_size}, {sim.priority})", flush=True)
        print(f"  point the supervisor at it: SPOT_EVENTS_ENDPOINT={sim.url}", flush=True)
        if args.evict_after is not None:
            result = sim.simulate_eviction(delay_s=args.notice, after_s=args.evict_after)
            log.info("eviction %s scheduled: appears in %gs, NotBefore %s", result["EventId"],
                     args.evict_after, result["NotBefore"])
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sim.stop()
    print("imds simulator stopped", flush=True)
    return 0
