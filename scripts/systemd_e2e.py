"""The packaged unit under a real systemd: scripts/systemd-e2e.sh runs this.

Builds the package from the checkout (and a second version for the upgrade),
boots a Debian container with systemd as PID 1 (nspawn_container.py), installs
with the real orchestrate.sh, points the service at an Azurite and an IMDS
simulator on the host (the container shares the host's network) through
/etc/spot-supervisor/env, and runs the checks of systemd_e2e_checks.py, each
judged from systemctl/journalctl inside the container. Prints every check with
the journal lines it rests on.

Exit status: 0 every check passed; 1 a check failed; 77 this machine cannot
run it (one line saying why, e.g. not root or no Debian mirror).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from azure.storage.queue import QueueClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # testsupport/, when run as a script
from nspawn_container import CannotRun, Container, debian_mirror, ensure_host_tools, log, rootfs_archive  # noqa: E402
from systemd_e2e_checks import CHECKS, CheckFailed, Service  # noqa: E402

from testsupport.azurite import connection_string, start_azurite  # noqa: E402
from testsupport.azurite import stop_azurite as stop  # noqa: E402
from testsupport.net import free_port, wait_for_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HANDLER = REPO / "scripts" / "systemd_e2e_handler"
EXIT_SKIP = 77
VM_NAME = "spot-e2e-vm"


def project_version(pyproject: Path) -> str:
    match = re.search(r'(?m)^version = "([^"]+)"', pyproject.read_text())
    assert match, f"no version in {pyproject}"
    return match.group(1)


def bumped(version: str) -> str:
    match = re.fullmatch(r"(.*?)(\d+)", version.split("+")[0])
    assert match, version
    return f"{match.group(1)}{int(match.group(2)) + 1}"


def build_package(source: Path, out: Path) -> Path:
    result = subprocess.run(["bash", str(source / "packaging" / "build.sh"), "--out", str(out), "--python", sys.executable,
                             "--with", str(HANDLER)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"packaging/build.sh failed: {result.stderr.strip()[-800:]}")
    return Path(result.stdout.strip().splitlines()[-1])


def build_packages(work: Path) -> tuple[Path, Path, str, str]:
    """This checkout's package, and the same sources with the version bumped (the upgrade)."""
    v1 = project_version(REPO / "pyproject.toml")
    v2 = bumped(v1)
    copy = work / "repo-v2"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "orchestrate.sh"):
        shutil.copy2(REPO / name, copy / name)
    for name in ("supervisor", "worker", "config", "packaging"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = copy / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = "[^"]+"', f'version = "{v2}"', pyproject.read_text(), count=1))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        builds = [pool.submit(build_package, source, work / f"dist-{name}") for source, name in ((REPO, "v1"), (copy, "v2"))]
        archive_1, archive_2 = (b.result() for b in builds)
    return archive_1, archive_2, v1, v2


def unpack_into(archive: Path, dest: Path) -> None:
    dest.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest)  # our own archive, just built


class Simulator:
    """`spot-supervisor simulate` on a free port of the host."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = (workdir / "imds-simulator.log").open("wb")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "spot-supervisor"), "simulate", "--port", str(self.port),
                                      "--vm-name", VM_NAME], stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        return json.loads(text) if text else None

    def close(self) -> None:
        stop(self.proc)  # type: ignore[arg-type]
        self.log.close()


def env_file(queue_port: int, queue_name: str, imds_url: str) -> str:
    return "\n".join([
        "# written by scripts/systemd_e2e.py, as cloud-init or an operator would",
        f"SPOT_QUEUE_CONNECTION_STRING={connection_string(queue_port)}",
        f"SPOT_QUEUE_NAME={queue_name}",
        "SPOT_WORKLOAD_HANDLER=spot_e2e_handler:handle",
        "SPOT_SCALING_WORKERS=2",
        "SPOT_EVENTS_SOURCE=azure",
        f"SPOT_EVENTS_ENDPOINT={imds_url}",
        "SPOT_SHUTDOWN_DRAIN_TIMEOUT_S=5",
        "SPOT_SHUTDOWN_KILL_GRACE_S=2",
        "",
    ])


def cached_builds(work: Path, keep: Path | None) -> tuple[Path, Path, str, str]:
    """--keep-packages DIR (development): reuse the two archives from an earlier run, if the versions match."""
    if keep is not None:
        v1 = project_version(REPO / "pyproject.toml")
        kept = [keep / f"spot-supervisor-{v}.tar.gz" for v in (v1, bumped(v1))]
        if all(k.exists() for k in kept):
            log(f"reusing the packages in {keep} (--keep-packages): not this checkout's code unless it is unchanged")
            return kept[0], kept[1], v1, bumped(v1)
    archive_1, archive_2, v1, v2 = build_packages(work)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        archive_1, archive_2 = (Path(shutil.copy2(a, keep / a.name)) for a in (archive_1, archive_2))
    return archive_1, archive_2, v1, v2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep-packages", type=Path, metavar="DIR",
                        help="development: keep the built packages in DIR and reuse them on the next run")
    args = parser.parse_args()
    started = time.monotonic()
    try:
        ensure_host_tools()
        mirror = debian_mirror()
    except CannotRun as exc:
        print(f"systemd-e2e: skipped: {exc}", flush=True)
        return EXIT_SKIP
    work = Path(tempfile.mkdtemp(prefix="spot-e2e-", dir="/var/tmp"))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:  # debootstrap (or the cache) and the builds overlap
            rootfs_job = pool.submit(rootfs_archive, mirror)
            builds_job = pool.submit(cached_builds, work, args.keep_packages)
            try:
                archive, cached = rootfs_job.result()
            except CannotRun as exc:
                print(f"systemd-e2e: skipped: {exc}", flush=True)
                return EXIT_SKIP
            archive_1, archive_2, v1, v2 = builds_job.result()
        log(f"rootfs {'from the cache' if cached else 'built'} ({archive.name}), packages {v1} and {v2} built, "
            f"{time.monotonic() - started:.1f}s")
        return run_checks(work, archive, archive_1, archive_2, v1, v2, started, cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_checks(work: Path, archive: Path, archive_1: Path, archive_2: Path, v1: str, v2: str, started: float,
               cached: bool) -> int:
    queue_port = free_port()
    queue_name = f"e2e{uuid.uuid4().hex[:12]}"
    azurite_log = (work / "azurite.log").open("wb")
    azurite = start_azurite(queue_port, work, azurite_log)
    simulator = Simulator(work)
    failures: list[str] = []
    try:
        queue = QueueClient.from_connection_string(connection_string(queue_port), queue_name)
        queue.create_queue()
        with (work / "nspawn.log").open("wb") as console, Container(archive, work, console) as container:
            unpack_into(archive_1, container.rootfs / "root" / "pkg-v1")
            unpack_into(archive_2, container.rootfs / "root" / "pkg-v2")
            log(f"container booted to running in {container.boot():.1f}s")
            service = Service(container, queue, simulator, env_file(queue_port, queue_name, simulator.url), v1, v2, VM_NAME)
            for check in CHECKS:
                began = time.monotonic()
                try:
                    evidence = check(service)
                except (CheckFailed, RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                    failures.append(check.__name__)
                    print(f"FAIL {check.__name__} ({time.monotonic() - began:.1f}s): {exc}", flush=True)
                    for line in service.recent_journal():
                        print(f"    | {line}", flush=True)
                    break  # later checks build on this one's state
                print(f"ok   {check.__name__} ({time.monotonic() - began:.1f}s)", flush=True)
                for line in evidence:
                    print(f"    | {line}", flush=True)
            if container.init_pid:
                log(f"container powered off in {container.poweroff():.1f}s")
    finally:
        simulator.close()
        stop(azurite)
        azurite_log.close()
    total = time.monotonic() - started
    verdict = f"{len(failures)} check(s) failed: {', '.join(failures)}" if failures else f"all {len(CHECKS)} checks passed"
    log(f"{verdict} in {total:.0f}s ({'rootfs from the cache' if cached else 'from nothing: rootfs built'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
