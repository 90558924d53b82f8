"""The local end-to-end story: a Spot VM is evicted mid-run and nothing is lost.

Azurite (the queue) + the IMDS simulator (Scheduled Events) + spot-supervisor
with several workers; 100 sample messages; an eviction notice arrives mid-run;
the supervisor drains, acknowledges and exits; a replacement "VM" (a second
supervisor) finishes the rest, resuming interrupted messages from their
checkpoints. No cloud account needed.

`demo.sh --program` runs the same story with a program as the handler
(examples/render_frames.sh: 10 frames of 40 ms per message, a checkpoint after
each, SIGTERM honoured) instead of the sample Python handler.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO

import httpx
from azure.storage.queue import QueueClient

from testsupport.azurite import connection_string, start_azurite, stop_azurite
from testsupport.net import free_port, wait_for_port

MESSAGES = 100
QUEUE = "demo-work"
VM_NAME = "vm-spot-07"
BIN = Path(sys.executable).parent / "spot-supervisor"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "render_frames.sh"
FRAMES = 10


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def echo(stream: IO[bytes], prefix: str, lines: list[str]) -> None:
    for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        lines.append(line)
        print(f"{prefix}{line}", flush=True)


def supervisor(config: Path, env: dict[str, str], prefix: str) -> tuple[subprocess.Popen[bytes], list[str], threading.Thread]:
    proc = subprocess.Popen([str(BIN), "run", "--config", str(config)], env=env, stderr=subprocess.PIPE)
    lines: list[str] = []
    assert proc.stderr is not None
    reader = threading.Thread(target=echo, args=(proc.stderr, prefix, lines), daemon=True)
    reader.start()
    return proc, lines, reader


def completed(results: Path) -> list[dict[str, object]]:
    """One record per finished message: {"id", "resumed_from"}; from the sample handler's JSON lines,
    or from the example program's frame log ("<id> <frame> <pid>" per frame)."""
    if not results.exists():
        return []
    lines = [line for line in results.read_text().splitlines() if line.strip()]
    if not lines or lines[0].startswith("{"):
        return [json.loads(line) for line in lines]
    first_frame: dict[tuple[str, str], int] = {}  # (message id, program pid) -> the frame that run began with
    records: list[dict[str, object]] = []
    for line in lines:
        message_id, frame, pid = line.split()
        first_frame.setdefault((message_id, pid), int(frame))
        if int(frame) == FRAMES - 1:
            records.append({"id": message_id, "resumed_from": first_frame[(message_id, pid)]})
    return records


def queued(client: QueueClient) -> int:
    return int(client.get_queue_properties().approximate_message_count or 0)


def write_config(path: Path, azurite_port: int, imds_url: str, source: str, workers: int, workload: str) -> None:
    path.write_text(f"""
[queue]
connection_string = "{connection_string(azurite_port)}"
name = "{QUEUE}"
visibility_timeout_s = 30
batch_size = 8

[workload]
{workload}

[scaling]
workers = {workers}

[events]
source = "{source}"
endpoint = "{imds_url}"
poll_interval_s = 0.5

[shutdown]
drain_timeout_s = 20
""")


def main() -> int:
    program = "--program" in sys.argv[1:]
    work = Path(tempfile.mkdtemp(prefix="spot-demo-"))
    results = work / ("frames.txt" if program else "results.jsonl")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env["SPOT_SAMPLE_RESULTS"] = str(results)
    env.update(RENDER_LOG=str(results), RENDER_FRAME_S="0.04")  # read by the example program only
    workload = f'command = "{EXAMPLE}"' if program else 'handler = "worker.sample:handle"'
    env["PYTHONUNBUFFERED"] = "1"

    banner("starting Azurite (queue emulator) and the IMDS simulator")
    azurite_port, imds_port = free_port(), free_port()
    azurite_log = (work / "azurite.log").open("wb")
    azurite = start_azurite(azurite_port, work, azurite_log)
    simulator = subprocess.Popen([str(BIN), "simulate", "--port", str(imds_port), "--vm-name", VM_NAME],
                                 env=env, stdout=subprocess.DEVNULL, stderr=(work / "imds.log").open("wb"))
    wait_for_port(imds_port)
    imds_url = f"http://127.0.0.1:{imds_port}"
    print(f"Azurite on 127.0.0.1:{azurite_port}, IMDS simulator on {imds_url}, work dir {work}")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        spot_config, replacement_config = work / "spot-vm.toml", work / "replacement-vm.toml"
        write_config(spot_config, azurite_port, imds_url, "azure", workers=4, workload=workload)
        write_config(replacement_config, azurite_port, imds_url, "none", workers=2, workload=workload)
        client = QueueClient.from_connection_string(connection_string(azurite_port), QUEUE)

        if program:
            banner(f"enqueue {MESSAGES} messages (program {EXAMPLE.name}: {FRAMES} frames of 40 ms, checkpoint after each)")
            subprocess.run([str(BIN), "enqueue", "--config", str(spot_config), "--file", "-"], env=env, check=True,
                           input=f"{FRAMES}\n".encode() * MESSAGES)
        else:
            banner(f"enqueue {MESSAGES} messages (sample handler: 10 chunks of 40 ms CPU, checkpoint after each)")
            subprocess.run([str(BIN), "enqueue", "--config", str(spot_config), "--count", str(MESSAGES),
                            "--chunks", "10", "--chunk-ms", "40"], env=env, check=True)

        banner(f"Spot VM {VM_NAME}: spot-supervisor run with 4 workers")
        proc, lines, reader = supervisor(spot_config, env, "  [spot-vm] ")
        procs.append(proc)
        deadline = time.time() + 120
        while len(completed(results)) < MESSAGES // 4 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)

        banner("Azure evicts the VM: a Preempt appears in Scheduled Events (30 s notice, like `az vm simulate-eviction`)")
        notice = httpx.post(f"{imds_url}/simulate/eviction", json={"delay_s": 30}).json()
        noticed_at = time.time()
        print(f"event {notice['EventId']} NotBefore {notice['NotBefore']}", flush=True)
        # Drained and acknowledged, it holds without workers until the VM goes; nothing takes this
        # "VM" away, so stop it as the VM's shutdown would.
        deadline = time.time() + 60
        while proc.poll() is None and time.time() < deadline and not any("holding until" in line for line in lines):
            time.sleep(0.05)
        gone_after = time.time() - noticed_at
        proc.terminate()
        code = proc.wait(30)
        reader.join(5)
        done_on_spot = len({r["id"] for r in completed(results)})
        left = queued(client)
        acks = httpx.get(f"{imds_url}/simulate/acks").json()
        ack_after = (acks[0]["time"] - noticed_at) if acks else None

        banner("replacement VM: a fresh spot-supervisor finishes what the evicted one released")
        proc2, _, reader2 = supervisor(replacement_config, env, "  [new-vm]  ")
        procs.append(proc2)
        deadline = time.time() + 180
        while (len({r["id"] for r in completed(results)}) < MESSAGES or queued(client)) and time.time() < deadline:
            time.sleep(0.2)
        proc2.terminate()
        proc2.wait(30)
        reader2.join(5)

        records = completed(results)
        unique = {r["id"] for r in records}
        resumed = [r for r in records if int(r["resumed_from"]) > 0]  # type: ignore[call-overload]
        lost = MESSAGES - len(unique) - queued(client)
        banner("summary")
        print(f"evicted VM:   supervisor exit code {code}, drained and holding {gone_after:.2f}s after the notice "
              f"(30 s allowed), event acknowledged {'%.2fs' % ack_after if ack_after is not None else 'NOT'} after the notice")
        if acks:
            print(f"              acknowledgement body: {acks[0]['raw']}  header Metadata: {acks[0]['headers'].get('Metadata')}")
        print(f"              processed {done_on_spot}, left on the queue {left} (unstarted and interrupted ones released at once)")
        print(f"replacement:  processed {len(unique) - done_on_spot}, of which {len(resumed)} resumed from a checkpoint")
        print(f"total:        {len(unique)} of {MESSAGES} processed, {len(records) - len(unique)} duplicate(s), "
              f"still queued {queued(client)}, lost = {lost}")
        ok = code == 0 and bool(acks) and lost == 0 and len(unique) == MESSAGES
        print("RESULT: " + ("OK: drained, acknowledged, nothing lost" if ok else "FAILED"), flush=True)
        return 0 if ok else 1
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        simulator.terminate()
        simulator.wait(10)
        stop_azurite(azurite)
        azurite_log.close()


if __name__ == "__main__":
    sys.exit(main())
