"""A throw-away Debian container with a real systemd as PID 1 (systemd-nspawn).

The root file system comes from `debootstrap --variant=minbase` of bookworm,
from the Debian mirror apt already uses, and is cached as a tarball under
~/.cache/spot-supervisor, keyed by the suite and the package list; each run
unpacks its own copy. Works without a systemd on the host: nspawn runs in a
cgroup of its own (v1 name=systemd and v2 hierarchies), removed afterwards, so
two containers at once do not collide.

Commands run inside with `nsenter -a` into the container's init. Each must end
by itself: at halt, systemd-shutdown SIGSTOPs whatever an nsenter left behind
and the halt hangs.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import IO

SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "procps")
HOST_TOOLS = {"systemd-nspawn": "systemd-container", "debootstrap": "debootstrap", "nsenter": "util-linux"}
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class CannotRun(Exception):
    """This machine cannot run the container (not root, no mirror, no tools): a reason to skip."""


def log(text: str) -> None:
    print(f"systemd-e2e: {text}", flush=True)


def debian_mirror(suite: str = SUITE) -> str:
    """The first apt source serving `suite` (deb822 .sources or one-line .list)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"(?m)^([A-Za-z-]+):\s*(.*)$", stanza))
                if fields.get("Enabled", "yes") != "no" and "deb" in fields.get("Types", "").split() \
                        and suite in fields.get("Suites", "").split() and fields.get("URIs"):
                    return fields["URIs"].split()[0]
        elif path.name == "sources.list" or path.suffix == ".list":
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == suite:
                    return words[1]
    raise CannotRun(f"no Debian {suite} mirror in /etc/apt/sources.list(.d) for debootstrap")


def ensure_host_tools() -> None:
    if os.geteuid() != 0:
        raise CannotRun("needs root (systemd-nspawn, debootstrap)")
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").exists():
            raise CannotRun(f"no cgroup hierarchy at {root} (expected a cgroup v1+v2 hybrid host)")
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise CannotRun(f"{', '.join(missing)} not installed and no apt-get")
    log(f"apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        result = subprocess.run(install, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["?"])[-1]
            raise CannotRun(f"apt-get install {' '.join(missing)} failed: {last}")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spot-supervisor"


def rootfs_archive(mirror: str) -> tuple[Path, bool]:
    """The cached rootfs tarball, built first if missing. Returns (path, was_cached)."""
    key = hashlib.sha256(f"{SUITE} minbase {','.join(sorted(PACKAGES))}".encode()).hexdigest()[:12]
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"rootfs-{SUITE}-{key}.tar.zst"
    with (cache / f".rootfs-{key}.lock").open("w") as lock:
        import fcntl

        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once build it once
        if archive.exists():
            return archive, True
        build = Path(tempfile.mkdtemp(prefix=f".rootfs-{key}-", dir=cache))
        try:
            log(f"debootstrap --variant=minbase {SUITE} from {mirror} (cached afterwards as {archive})")
            result = subprocess.run(
                ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(build / "rootfs"), mirror],
                capture_output=True, text=True)
            if result.returncode != 0:
                tail = " | ".join((result.stdout + result.stderr).strip().splitlines()[-3:])
                raise CannotRun(f"debootstrap from {mirror} failed: {tail}")
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for entry in (build / "rootfs" / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = archive.with_suffix(".partial")
            subprocess.run(["tar", "--numeric-owner", "--xattrs", "-I", "zstd -T0 -3", "-C", str(build / "rootfs"), "-cf",
                            str(partial), "."], check=True)
            partial.rename(archive)
        finally:
            shutil.rmtree(build, ignore_errors=True)
        return archive, False


class Container:
    """One booted container. Use as a context manager: it always halts and cleans up."""

    def __init__(self, archive: Path, workdir: Path, log_file: IO[bytes]) -> None:
        self.name = f"spot-e2e-{uuid.uuid4().hex[:8]}"
        self.rootfs = workdir / "rootfs"
        self.log_file = log_file
        self.cgroups = [root / self.name for root in CGROUP_ROOTS]
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.rootfs.mkdir(parents=True)
        subprocess.run(["tar", "--numeric-owner", "--xattrs", "-I", "zstd", "-C", str(self.rootfs), "-xf", str(archive)], check=True)
        (self.rootfs / "etc" / "hostname").write_text("spot-e2e\n")
        (self.rootfs / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        # Persistent journal: `journalctl -b -1` after a reboot shows the previous boot.
        (self.rootfs / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)
        for cgroup in self.cgroups:
            cgroup.mkdir()

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _join_cgroup(self) -> None:  # runs in the child between fork and exec
        for cgroup in self.cgroups:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def boot(self, timeout: float = 120) -> float:
        """Start the container and wait until systemd reports running. Returns the seconds it took."""
        started = time.monotonic()
        self.nspawn = subprocess.Popen(
            ["systemd-nspawn", "-D", str(self.rootfs), "--boot", "--register=no", "--keep-unit", "--console=pipe",
             f"--machine={self.name}"],
            stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT, preexec_fn=self._join_cgroup)
        deadline = started + timeout
        while not self.init_pid:
            if self.nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited {self.nspawn.returncode} before the container booted")
            if time.monotonic() > deadline:
                raise TimeoutError("the container's init did not appear")
            self.init_pid = self._find_init()
            time.sleep(0.05)
        state = ""
        while state not in ("running", "degraded", "maintenance", "stopping"):
            # Until the container's systemd has exec'd and set up its bus, systemctl answers nothing.
            if time.monotonic() > deadline:
                break
            state = self.run("systemctl", "is-system-running", "--wait", timeout=max(1.0, deadline - time.monotonic()),
                             check=False).stdout.strip()
            if not state or state == "offline":
                time.sleep(0.1)
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", "--plain", check=False).stdout.strip()
            log(f"container is degraded: {failed}")
        elif state != "running":
            raise RuntimeError(f"the container's systemd is {state or 'silent'}, not running")
        return time.monotonic() - started

    def _find_init(self) -> int:
        assert self.nspawn is not None
        for status in Path("/proc").glob("[0-9]*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            if fields.get("PPid", "").strip() == str(self.nspawn.pid) and fields.get("NSpid", "").split()[-1:] == ["1"]:
                return int(status.parent.name)
        return 0

    def run(self, *argv: str, timeout: float = 60, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (all its namespaces, a clean environment) and wait for it."""
        if not self.init_pid:
            raise RuntimeError("the container is not running")
        command = ["nsenter", "-t", str(self.init_pid), "-a", "--", "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8",
                   "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise RuntimeError(f"in the container, {' '.join(argv)} exited {result.returncode}: "
                               f"{(result.stderr or result.stdout).strip()[-400:]}")
        return result

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> str:
        return self.run("bash", "-c", script, timeout=timeout, check=check).stdout

    def poweroff(self, timeout: float = 120) -> float:
        """`systemctl poweroff` inside, then wait for nspawn to end. Returns the seconds it took."""
        assert self.nspawn is not None
        started = time.monotonic()
        self.run("systemctl", "poweroff", "--no-block", check=False)
        self.nspawn.wait(timeout)
        self.init_pid = 0
        return time.monotonic() - started

    def close(self) -> None:
        if self.nspawn is not None and self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container to halt
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                self._kill_everything()
                self.nspawn.wait(10)
        self._kill_everything()
        for cgroup in self.cgroups:
            for directory in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                directory.rmdir()
            if cgroup.exists():
                cgroup.rmdir()
        shutil.rmtree(self.rootfs, ignore_errors=True)

    def _kill_everything(self) -> None:
        cgroup = self.cgroups[-1]  # the v2 hierarchy: every process of the container is somewhere below
        for _ in range(50):
            pids = {int(p) for procs in cgroup.rglob("cgroup.procs") for p in procs.read_text().split()} \
                if cgroup.exists() else set()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
