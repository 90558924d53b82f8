"""Every bad configuration value stops the real `spot-supervisor run` / `plan` process with exactly one line
naming the key, exit 78 (EX_CONFIG): systemd then leaves it stopped instead of restarting it in a loop
(exit 1 is "unexpected": restarted). Each key of config/default.toml has at least one bad value here."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import tomllib

from testsupport.harness import REPO

EX_CONFIG = 78
DEFAULT_TOML = REPO / "config" / "default.toml"
# A configuration that is otherwise good: `run` would start (the queue is never reached before the check).
BASE = {"queue": {"connection_string": '"UseDevelopmentStorage=true"'}, "events": {"source": '"none"'},
        "cost": {"enabled": "false"}}


@dataclass(frozen=True)
class Bad:
    key: str  # section.key as the error line must name it
    toml: str | None = None  # the value as a TOML literal, in the file
    env: str | None = None  # or the value of SPOT_<SECTION>_<KEY>

    @property
    def section(self) -> str:
        return self.key.split(".")[0]


CASES = [
    # [queue]
    Bad("queue.connection_string", '"not a connection string"'),
    Bad("queue.connection_string", '"AccountName=acct"'),
    Bad("queue.account_url", '"https://"'),  # no host: the SDK refused it in every worker (exit 1, a crash loop)
    Bad("queue.account_url", '"ftp://acct.queue.core.windows.net"'),
    Bad("queue.client_id", "5"),
    Bad("queue.name", '"Bad_Name"'),
    Bad("queue.visibility_timeout_s", "0"),
    Bad("queue.visibility_timeout_s", env="sixty"),
    Bad("queue.batch_size", "33"),
    Bad("queue.prefetch_s", "nan"),
    Bad("queue.max_outstanding_settles", "9"),
    Bad("queue.max_dequeue_count", "0"),
    Bad("queue.message_encoding", '"utf-8"'),
    Bad("queue.api_version", '"2099-01-01"'),  # unknown to the SDK: refused in every worker (exit 1)
    Bad("queue.api_version", env="yesterday"),
    Bad("queue.retry_delay_s", "0"),
    Bad("queue.retry_delay_max_s", "inf"),
    Bad("queue.idle_poll_max_s", "0"),
    Bad("queue.request_timeout_s", "-5"),
    # [workload]
    Bad("workload.handler", '"not a reference"'),
    Bad("workload.mode", '"sideways"'),
    Bad("workload.command", "\"'unclosed\""),
    Bad("workload.command", '"   "'),
    Bad("workload.stop_signal", '"SIGKILL"'),
    Bad("workload.timeout_s", "-1"),
    # [scaling]
    Bad("scaling.workers_per_core", "0"),
    Bad("scaling.threads_per_core", "0"),
    Bad("scaling.workers", "-1"),
    Bad("scaling.workers", "100000"),  # had no bound at all: 100000 processes
    Bad("scaling.workers", env="lots"),
    Bad("scaling.min_workers", "0"),
    Bad("scaling.max_workers", "100000"),
    Bad("scaling.memory_per_worker_mb", "-1"),
    Bad("scaling.workers_per_gpu", "65"),
    Bad("scaling.respawn_delay_max_s", "1e9"),
    Bad("scaling.worker_timeout_s", "1"),
    Bad("scaling.sku", '"Standard_D2s_v3"'),
    # [events]
    Bad("events.source", '"carrier-pigeon"'),
    Bad("events.endpoint", '"169.254.169.254"'),
    Bad("events.endpoint", '"http://[::1"'),  # unparseable: every poll raised (exit 1 or a dead watcher)
    Bad("events.endpoint", env="http://169.254.169.254:99999"),
    Bad("events.endpoint", '"http://"'),
    Bad("events.poll_interval_s", "61"),
    Bad("events.request_timeout_s", "0"),
    Bad("events.drain_on", "[]"),  # would never drain on a notice, silently
    Bad("events.drain_on", env=" , "),
    Bad("events.drain_on", '["Evict"]'),
    Bad("events.safety_margin_s", "-1"),
    Bad("events.started_deadline_s", "0"),
    Bad("events.ack", '"sometimes"'),
    Bad("events.on_rebalance", '"sometimes"'),
    Bad("events.dmi_dir", '""'),
    Bad("events.vm_name", '"   "'),  # matches no event, ever: evictions silently ignored
    Bad("events.vm_name", env=" vm-spot-07"),
    # [shutdown]
    Bad("shutdown.drain_timeout_s", "0"),
    Bad("shutdown.kill_grace_s", "-1"),
    # [telemetry]
    Bad("telemetry.connection_string", "1"),
    Bad("telemetry.service_name", "[]"),
    Bad("telemetry.log_level", '"LOUD"'),
    # [startup]
    Bad("startup.wait_for_provisioning", '"yes"'),
    Bad("startup.arm_endpoint", '"https://"'),
    Bad("startup.provisioning_timeout_s", "0"),
    # [cost]
    Bad("cost.enabled", '"sure"'),
    Bad("cost.prices_endpoint", '"file:///etc/passwd"'),
    Bad("cost.prices_endpoint", '"https://prices.azure.com:http/api"'),
    # [fleet]: the per-VM service validates the section too (one file configures the keeper and the VMs)
    Bad("fleet.scale_sets", '["vmss-a"]'),
    Bad("fleet.scale_sets", '"/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/a"'),
    Bad("fleet.target", '"whatever"'),
    Bad("fleet.messages_per_vm", "0"),
    Bad("fleet.vms", "-1"),
    Bad("fleet.min_vms", "100000"),
    Bad("fleet.max_vms", env="-3"),
    Bad("fleet.interval_s", "0"),
    Bad("fleet.on_deallocated", '"ignore"'),
    Bad("fleet.arm_endpoint", '"http://management.azure.com"'),
    Bad("fleet.arm_endpoint", '"https://"'),
    Bad("fleet.client_id", '"not-a-guid"'),
    Bad("fleet.retire_when_idle_s", "-1"),
    Bad("fleet.allocation_cooldown_s", "0"),
    Bad("fleet.allocation_cooldown_max_s", "1"),
    Bad("fleet.request_timeout_s", "nan"),
]


def _toml(case: Bad) -> str:
    sections = {name: dict(keys) for name, keys in BASE.items()}
    if case.toml is not None:
        section, key = case.key.split(".", 1)
        sections.setdefault(section, {})[key] = case.toml
        if case.key == "queue.account_url":  # one or the other
            del sections["queue"]["connection_string"]
    return "".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) for name, keys in sections.items())


def _run(command: str, config: Path, env_overrides: dict[str, str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update(env_overrides, PYTHONPATH=str(REPO))
    try:
        return subprocess.run([sys.executable, "-m", "supervisor", command, "--config", str(config)], env=env,
                              capture_output=True, text=True, timeout=60, cwd=config.parent)
    except subprocess.TimeoutExpired as exc:  # a bad value that was not refused: the service is running
        return subprocess.CompletedProcess(exc.cmd, -9, str(exc.stdout or ""), "still running after 60 s")


def _problem(case: Bad, index: int, tmp_path: Path) -> str | None:
    config = tmp_path / f"case{index}.toml"
    config.write_text(_toml(case))
    env = {} if case.env is None else {f"SPOT_{case.key.replace('.', '_').upper()}": case.env}
    result = _run("plan" if case.env is not None else "run", config, env)
    lines = result.stderr.splitlines()
    if result.returncode == EX_CONFIG and len(lines) == 1 and f"config error: {case.key}" in lines[0]:
        return None
    return f"{case}: exit {result.returncode}, stderr:\n{result.stderr[-1500:]}"


def test_every_bad_value_exits_78_with_one_line_naming_the_key(tmp_path: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        problems = [p for p in pool.map(lambda item: _problem(item[1], item[0], tmp_path), enumerate(CASES)) if p]
    assert not problems, "\n\n".join(problems)


def test_every_key_of_default_toml_has_a_bad_value_here() -> None:
    documented = tomllib.loads(DEFAULT_TOML.read_text())
    keys = {f"{section}.{key}" for section, table in documented.items() for key in table}
    assert keys - {case.key for case in CASES} == set()


def test_a_config_file_that_is_not_utf8_exits_78_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(_toml(Bad("x.y")).encode() + '[workload]\nhandler = "caf\u00e9:run"\n'.encode("latin-1"))
    for command in ("run", "plan"):
        result = _run(command, config, {})
        assert result.returncode == EX_CONFIG, result.stderr
        assert len(result.stderr.splitlines()) == 1 and "config error: --config" in result.stderr
        assert "UTF-8" in result.stderr


def test_the_good_base_configuration_plans(tmp_path: Path) -> None:
    """The cases above fail for their bad value, not for the rest of the file."""
    config = tmp_path / "good.toml"
    config.write_text(_toml(Bad("x.y")))
    result = _run("plan", config, {})
    assert result.returncode == 0, result.stderr
