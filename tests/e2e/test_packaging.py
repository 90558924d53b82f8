"""The VM Application package, orchestrate.sh and the systemd unit.

Builds the package (packaging/build.sh, wheels through pip's configured index,
pinned to this environment) twice: the repo's version and a bumped copy. Then
installs, upgrades and uninstalls it with `orchestrate.sh --root`, which
stages under a temporary directory and never touches systemd, users or /opt.
systemd-analyze and shellcheck checks skip when the tool is absent
(scripts/ci-deps.sh installs both on CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from azure.storage.queue import QueueClient

from testsupport.azurite import Azurite
from worker.settings import ShutdownSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "spot-supervisor.service"
ORCHESTRATE = REPO / "orchestrate.sh"
BUILD = REPO / "packaging" / "build.sh"
EXEC_START = "/opt/spot-supervisor/current/bin/spot-supervisor run --config /etc/spot-supervisor/config.toml"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def bumped(version: str) -> str:
    head, last = re.fullmatch(r"(.*?)(\d+)", version.split("+")[0]).groups()  # type: ignore[union-attr]
    return f"{head}{int(last) + 1}"


VERSION_2 = bumped(VERSION)


def clean_env(**extra: str) -> dict[str, str]:
    """No SPOT_* or PIP_* from the caller; any network attempt goes to a dead proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPOT_", "PIP_"))}
    dead = "http://127.0.0.1:9"
    env.update(http_proxy=dead, https_proxy=dead, HTTP_PROXY=dead, HTTPS_PROXY=dead, no_proxy="", NO_PROXY="")
    env.update(extra)
    return env


def run(*args: str | Path, env: dict[str, str] | None = None, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def build(repo: Path, out: Path, *extra: str | Path) -> Path:
    result = run("bash", repo / "packaging" / "build.sh", "--out", out, "--python", sys.executable, *extra, timeout=300)
    archive = Path(result.stdout.strip().splitlines()[-1])
    assert archive.is_file(), result.stderr
    return archive


def unpack(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    run("tar", "-xzf", archive, "-C", dest)
    return dest


def orchestrate(package: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run("bash", package / "orchestrate.sh", *args, "--python", sys.executable, env=clean_env(), check=check)


@pytest.fixture(scope="module")
def archive_v1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(REPO, tmp_path_factory.mktemp("dist1"))


HANDLER_PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "spot-test-handler"
version = "1.0"

[tool.setuptools]
py-modules = ["spot_test_handler"]
"""


@pytest.fixture(scope="module")
def archive_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same sources with a bumped version, built from a copy of the repo,
    with a user's handler project added to the virtualenv (--with)."""
    handler = tmp_path_factory.mktemp("handler")
    (handler / "pyproject.toml").write_text(HANDLER_PYPROJECT)
    (handler / "spot_test_handler.py").write_text("def handle(message, ctx):\n    return None\n")
    copy = tmp_path_factory.mktemp("repo2")
    for name in ("pyproject.toml", "README.md", "orchestrate.sh"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, copy / name)
    for name in ("supervisor", "worker", "config", "packaging"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = copy / "pyproject.toml"
    text, count = re.subn(r'(?m)^version = "[^"]+"', f'version = "{VERSION_2}"', pyproject.read_text())
    assert count == 1
    pyproject.write_text(text)
    return build(copy, tmp_path_factory.mktemp("dist2"), "--with", handler)


@pytest.fixture(scope="module")
def package_v1(archive_v1: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(archive_v1, tmp_path_factory.mktemp("pkg1") / "unpacked")


@pytest.fixture(scope="module")
def package_v2(archive_v2: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return unpack(archive_v2, tmp_path_factory.mktemp("pkg2") / "unpacked")


def requirement_name(requirement: str) -> str | None:
    """The normalised name of a runtime requirement that applies here, else None."""
    name, _, marker = requirement.partition(";")
    if "python_version<'3.11'" in marker.replace(" ", "").replace('"', "'") and sys.version_info >= (3, 11):
        return None
    return re.split(r"[<>=!~\[ ]", name.strip(), maxsplit=1)[0].lower().replace("-", "_").replace(".", "_")


# --- the package --------------------------------------------------------------------


def test_package_is_versioned_from_pyproject_and_self_contained(archive_v1: Path, archive_v2: Path) -> None:
    assert archive_v1.name == f"spot-supervisor-{VERSION}.tar.gz"
    assert archive_v2.name == f"spot-supervisor-{VERSION_2}.tar.gz"
    assert archive_v1.stat().st_size < 40 * 1024 * 1024
    with tarfile.open(archive_v1) as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers()}
        info = dict(line.split("=", 1) for line in tar.extractfile("./BUILD_INFO").read().decode().splitlines())  # type: ignore[union-attr]
        unit = tar.extractfile("./spot-supervisor.service").read()  # type: ignore[union-attr]
        config = tar.extractfile("./config/default.toml").read()  # type: ignore[union-attr]
        mode = tar.getmember("./orchestrate.sh").mode
        requirements = tar.extractfile("./requirements.txt").read().decode()  # type: ignore[union-attr]
    assert {"BUILD_INFO", "orchestrate.sh", "spot-supervisor.service", "config/default.toml"} <= names
    assert requirements == f"spot-supervisor=={VERSION}\n"
    assert mode & 0o111
    assert info["version"] == VERSION and info["python"] == "%d.%d" % sys.version_info[:2]
    # What runs is the commit only if nothing that goes into the package was changed since.
    packaged = ["pyproject.toml", "supervisor", "worker", "config", "orchestrate.sh", "packaging"]
    changed = run("git", "-C", REPO, "status", "--porcelain", "--", *packaged).stdout.strip()
    assert info["commit"] == run("git", "-C", REPO, "rev-parse", "--short", "HEAD").stdout.strip()
    assert info["tree"] == ("modified" if changed else "clean")
    assert unit == UNIT.read_bytes() and config == (REPO / "config" / "default.toml").read_bytes()
    wheels = {n.removeprefix("wheelhouse/").split("-")[0].lower() for n in names if n.endswith(".whl")}
    assert "spot_supervisor" in wheels and "pip" in wheels
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for requirement in dependencies:
        name = requirement_name(requirement)
        assert name is None or name in wheels, f"no wheel for {requirement} in the wheelhouse"


# --- orchestrate.sh ----------------------------------------------------------------------


def test_install_from_the_wheelhouse_offline_then_plan_runs(package_v1: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = orchestrate(package_v1, "-i", "--root", root)
    assert "no systemctl, no useradd/userdel, no chown" in result.stderr

    opt = root / "opt" / "spot-supervisor"
    assert os.readlink(opt / "current") == VERSION
    assert (opt / VERSION / "pyvenv.cfg").is_file()
    assert (opt / VERSION / "BUILD_INFO").read_bytes() == (package_v1 / "BUILD_INFO").read_bytes()  # the start-up line's source
    etc = root / "etc" / "spot-supervisor"
    assert (etc / "config.toml").read_bytes() == (REPO / "config" / "default.toml").read_bytes()
    assert (etc / "config.toml").stat().st_mode & 0o777 == 0o640
    assert (etc / "env").stat().st_mode & 0o777 == 0o640
    assert (root / "etc" / "systemd" / "system" / "spot-supervisor.service").read_bytes() == UNIT.read_bytes()

    plan = run(opt / "current" / "bin" / "spot-supervisor", "plan", "--config", etc / "config.toml",
               env=clean_env(SPOT_EVENTS_SOURCE="none"))
    assert "workers" in plan.stdout
    # The simulator subpackage ships too (`spot-supervisor simulate`), imported from the install, not the checkout.
    simulator = run(opt / "current" / "bin" / "python", "-I", "-c", "import supervisor.simulator.server as s; print(s.__file__)",
                    env=clean_env())
    assert str(opt) in simulator.stdout

    # Idempotent: a second install changes nothing and keeps the config.
    (etc / "config.toml").write_text((etc / "config.toml").read_text() + "\n# operator edit\n")
    again = orchestrate(package_v1, "-i", "--root", root)
    assert "already installed" in again.stderr
    assert (etc / "config.toml").read_text().endswith("# operator edit\n")
    assert sorted(p.name for p in opt.iterdir()) == [VERSION, "current"]


def test_installed_supervisor_processes_a_queue_on_azurite(package_v1: Path, tmp_path: Path, azurite: Azurite,
                                                          queue: QueueClient, queue_name: str) -> None:
    root = tmp_path / "root"
    orchestrate(package_v1, "-i", "--root", root)
    exe = root / "opt" / "spot-supervisor" / "current" / "bin" / "spot-supervisor"
    for n in range(20):
        queue.send_message(json.dumps({"n": n, "chunks": 1, "chunk_ms": 1}))
    results = tmp_path / "results.jsonl"
    env = clean_env(SPOT_EVENTS_SOURCE="none", SPOT_QUEUE_NAME=queue_name, SPOT_SCALING_WORKERS="2",
                    SPOT_QUEUE_CONNECTION_STRING=azurite.connection_string, SPOT_SAMPLE_RESULTS=str(results),
                    no_proxy="127.0.0.1", NO_PROXY="127.0.0.1")
    proc = subprocess.Popen([exe, "run", "--config", root / "etc" / "spot-supervisor" / "config.toml"], env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not results.exists() or len(results.read_text().splitlines()) < 20):
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    done = {json.loads(line)["id"] for line in results.read_text().splitlines()}
    stderr = proc.stderr.read() if proc.stderr else ""
    assert len(done) == 20, stderr
    commit = dict(line.split("=", 1) for line in (package_v1 / "BUILD_INFO").read_text().splitlines())["commit"]
    assert f"spot-supervisor {VERSION} (commit {commit}" in stderr.splitlines()[0]  # the start-up line
    assert queue.get_queue_properties().approximate_message_count == 0


def test_upgrade_installs_beside_keeps_the_config_and_switches_current(
        package_v1: Path, package_v2: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    orchestrate(package_v1, "-i", "--root", root)
    config = root / "etc" / "spot-supervisor" / "config.toml"
    edited = config.read_text().replace('name = "spot-work"', 'name = "edited-queue"')
    assert edited != config.read_text()
    config.write_text(edited)

    orchestrate(package_v2, "-g", "--root", root)
    opt = root / "opt" / "spot-supervisor"
    assert os.readlink(opt / "current") == VERSION_2
    assert os.readlink(opt / "previous") == VERSION  # kept: it may still be draining; the rollback
    assert (opt / VERSION / ".spot-installed").exists()
    assert config.read_text() == edited
    assert (package_v2 / "requirements.txt").read_text().splitlines() == [
        f"spot-supervisor=={VERSION_2}", "spot_test_handler==1.0"]
    run(opt / "current" / "bin" / "python", "-c", "import spot_test_handler, supervisor.vm.provisioning")
    plan = run(opt / "current" / "bin" / "spot-supervisor", "plan", "--config", config,
               env=clean_env(SPOT_EVENTS_SOURCE="none"))
    assert "workers" in plan.stdout

    # Rolling back is an upgrade to the previous package: instant, nothing reinstalled.
    back = orchestrate(package_v1, "-g", "--root", root)
    assert "already installed" in back.stderr
    assert os.readlink(opt / "current") == VERSION and os.readlink(opt / "previous") == VERSION_2
    assert config.read_text() == edited


def test_uninstall_keeps_only_the_config_and_purge_removes_it(package_v1: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    orchestrate(package_v1, "-i", "--root", root)
    unit = root / "etc" / "systemd" / "system" / "spot-supervisor.service"
    etc = root / "etc" / "spot-supervisor"

    orchestrate(package_v1, "-u", "--root", root)
    assert not (root / "opt" / "spot-supervisor").exists()
    assert not unit.exists()
    assert (etc / "config.toml").is_file() and (etc / "env").is_file()
    orchestrate(package_v1, "-u", "--root", root)  # idempotent

    orchestrate(package_v1, "-u", "--purge", "--root", root)
    assert not etc.exists()
    leftovers = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".orchestrate.lock")]
    assert leftovers == []


def test_orchestrate_refuses_bad_usage_and_a_package_for_another_python(package_v1: Path, tmp_path: Path) -> None:
    assert orchestrate(package_v1, "--root", tmp_path / "r", check=False).returncode == 2
    assert orchestrate(package_v1, "-i", "-u", "--root", tmp_path / "r", check=False).returncode == 2
    assert orchestrate(package_v1, "-i", "--purge", "--root", tmp_path / "r", check=False).returncode == 2
    assert orchestrate(package_v1, "-i", "--root", "/", check=False).returncode == 2
    not_a_package = run("bash", ORCHESTRATE, "-i", "--root", tmp_path / "r", env=clean_env(), check=False)
    assert not_a_package.returncode == 1 and "not a built package" in not_a_package.stderr

    other = tmp_path / "other"
    shutil.copytree(package_v1, other, symlinks=True)
    info = other / "BUILD_INFO"
    info.write_text(re.sub(r"(?m)^python=.*$", "python=2.7", info.read_text()))
    result = orchestrate(other, "-i", "--root", tmp_path / "r2", check=False)
    assert result.returncode == 1 and "built for Python 2.7" in result.stderr
    assert not (tmp_path / "r2" / "opt").exists()


@pytest.mark.parametrize("script", [ORCHESTRATE, BUILD, REPO / "scripts" / "ci-deps.sh", REPO / "scripts" / "systemd-e2e.sh"],
                         ids=lambda p: p.name)
def test_scripts_are_shellcheck_clean(script: Path) -> None:
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (scripts/ci-deps.sh installs it)")
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script.read_text()
    run("shellcheck", "--shell=bash", script)


# --- the systemd unit -----------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(value: str) -> float:
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def test_unit_holds_the_operator_contract() -> None:
    s = unit_settings()
    assert s["Type"] == ["notify"]
    assert s["ExecStart"] == [EXEC_START]
    assert "network-online.target" in s["After"][0].split() and "network-online.target" in s["Wants"][0].split()
    assert s["User"] == ["spot-supervisor"]
    assert s["Restart"] == ["on-failure"] and s["RestartPreventExitStatus"] == ["78"]
    assert s["KillMode"] == ["mixed"]
    defaults = ShutdownSettings()
    assert seconds(s["TimeoutStopSec"][0]) > defaults.drain_timeout_s + defaults.kill_grace_s
    assert s["EnvironmentFile"] == ["-/etc/spot-supervisor/env"]
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
                       "CapabilityBoundingSet": "", "RestrictSUIDSGID": "yes", "SystemCallArchitectures": "native"}.items():
        assert s[key] == [value], key
    assert "ReadWritePaths" not in s  # StateDirectory= is the one writable place
    assert s["WantedBy"] == ["multi-user.target"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/ci-deps.sh installs it)")
    # The unit as shipped: the only complaint allowed is that /opt/spot-supervisor is not installed here.
    shipped = run("systemd-analyze", "verify", UNIT, check=False)
    complaints = [line for line in (shipped.stdout + shipped.stderr).splitlines()
                  if line.strip() and "/opt/spot-supervisor/current/bin/spot-supervisor is not executable" not in line]
    assert complaints == []
    # The same unit with ExecStart pointing at an executable passes clean.
    executable = tmp_path / "bin" / "spot-supervisor"
    executable.parent.mkdir()
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    copy = tmp_path / "spot-supervisor.service"
    copy.write_text(UNIT.read_text().replace("/opt/spot-supervisor/current/bin/spot-supervisor", str(executable)))
    verified = run("systemd-analyze", "verify", copy, check=False)
    assert verified.returncode == 0 and (verified.stdout + verified.stderr).strip() == "", verified.stderr


def test_unit_exposure_score_stays_low() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (scripts/ci-deps.sh installs it)")
    result = run("systemd-analyze", "security", "--offline=true", "--no-pager", UNIT, check=False)
    match = re.search(r"Overall exposure level for spot-supervisor\.service: (\d+(?:\.\d+)?)", result.stdout)
    if match is None:
        pytest.skip(f"this systemd-analyze cannot score a unit file offline: {result.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 2.0, result.stdout


# --- the fleet keeper's unit (orchestrate.sh --fleet-keeper) ---------------------------------------

FLEET_UNIT = REPO / "packaging" / "spot-supervisor-fleet.service"


def test_fleet_keeper_install_needs_the_fleet_extra(package_v1: Path, tmp_path: Path) -> None:
    result = orchestrate(package_v1, "-i", "--fleet-keeper", "--root", tmp_path / "root", check=False)
    assert result.returncode == 1
    assert "--fleet-keeper: this package has no azure-mgmt-compute" in result.stderr
    assert not (tmp_path / "root" / "etc" / "systemd" / "system" / "spot-supervisor-fleet.service").exists()


def test_fleet_keeper_installs_its_unit_and_runs_the_keeper(tmp_path: Path) -> None:
    package = unpack(build(REPO, tmp_path / "dist", "--with", "azure-mgmt-compute>=39,<40"), tmp_path / "unpacked")
    assert (package / "spot-supervisor-fleet.service").read_bytes() == FLEET_UNIT.read_bytes()
    root = tmp_path / "root"
    orchestrate(package, "-i", "--fleet-keeper", "--root", root)
    units = root / "etc" / "systemd" / "system"
    assert (units / "spot-supervisor-fleet.service").read_bytes() == FLEET_UNIT.read_bytes()
    assert not (units / "spot-supervisor.service").exists()
    keeper = run(root / "opt" / "spot-supervisor" / "current" / "bin" / "spot-supervisor", "fleet", "plan", "--config",
                 root / "etc" / "spot-supervisor" / "config.toml", env=clean_env(SPOT_QUEUE_CONNECTION_STRING="UseDevelopmentStorage=true"),
                 check=False)
    assert keeper.returncode == os.EX_CONFIG and "fleet.scale_sets: required" in keeper.stderr
    assert "ExecStart=/opt/spot-supervisor/current/bin/spot-supervisor fleet run --config" in FLEET_UNIT.read_text()
