"""Typed settings: TOML file, then `SPOT_<SECTION>_<KEY>` environment overrides.

Shared by the supervisor and the workers, so it lives on the worker side
(the supervisor imports worker, never the reverse). Every key and its default
is documented in config/default.toml; a test keeps the two in step.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import signal
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "SPOT_"
MAX_BATCH_SIZE = 32  # the Queue service's limit for one Get Messages call
MAX_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
DEFAULT_DRAIN_ON = ("Preempt", "Terminate", "Reboot", "Redeploy")
EVENT_TYPES = ("Freeze", "Reboot", "Redeploy", "Preempt", "Terminate")


class ConfigError(Exception):
    """An invalid or missing setting. str() is the one line shown to the operator."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"config error: {key}: {problem}")
        self.key = key


@dataclass(frozen=True)
class QueueSettings:
    connection_string: str = ""
    account_url: str = ""
    client_id: str = ""
    name: str = "spot-work"
    visibility_timeout_s: int = 60
    batch_size: int = 32
    prefetch_s: float = 2.0
    max_dequeue_count: int = 5
    message_encoding: str = "none"
    api_version: str = ""
    retry_delay_s: float = 2.0
    retry_delay_max_s: float = 300.0
    idle_poll_max_s: float = 5.0
    request_timeout_s: float = 30.0

    @property
    def poison_name(self) -> str:
        return f"{self.name}-poison"


@dataclass(frozen=True)
class WorkloadSettings:
    handler: str = "worker.sample:handle"
    mode: str = "scale-out"
    command: str = ""
    stop_signal: str = "SIGTERM"
    timeout_s: float = 0.0


@dataclass(frozen=True)
class ScalingSettings:
    workers_per_core: float = 1.0
    threads_per_core: int = 4
    workers: int = 0
    min_workers: int = 1
    max_workers: int = 64
    memory_per_worker_mb: int = 256
    respawn_delay_max_s: float = 30.0
    sku: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class EventsSettings:
    source: str = "azure"
    endpoint: str = "http://169.254.169.254"
    poll_interval_s: float = 1.0
    request_timeout_s: float = 5.0
    drain_on: tuple[str, ...] = DEFAULT_DRAIN_ON
    safety_margin_s: float = 5.0
    started_deadline_s: float = 5.0
    ack: str = "sole"
    vm_name: str = ""


@dataclass(frozen=True)
class ShutdownSettings:
    drain_timeout_s: float = 30.0
    kill_grace_s: float = 3.0


@dataclass(frozen=True)
class TelemetrySettings:
    connection_string: str = ""
    service_name: str = "spot-supervisor"
    log_level: str = "INFO"


@dataclass(frozen=True)
class StartupSettings:
    wait_for_provisioning: bool = False
    arm_endpoint: str = "https://management.azure.com"
    provisioning_timeout_s: float = 900.0


@dataclass(frozen=True)
class Settings:
    queue: QueueSettings = field(default_factory=QueueSettings)
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    events: EventsSettings = field(default_factory=EventsSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    startup: StartupSettings = field(default_factory=StartupSettings)
    source: str = "defaults"


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(Settings)[f.name] for f in dataclasses.fields(Settings) if f.name != "source"}


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                  require_queue: bool = True) -> Settings:
    """Read the TOML file (if any), apply environment overrides, validate.

    require_queue=False is for commands that never touch the queue (`plan`)."""
    env = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    for section in raw:
        if section not in SECTIONS:
            raise ConfigError(section, f"unknown section; allowed: {', '.join(SECTIONS)}")
        if not isinstance(raw[section], dict):
            raise ConfigError(section, "must be a table")
    values = {name: _build_section(name, cls, raw.get(name, {}), env) for name, cls in SECTIONS.items()}
    settings = Settings(**values, source=str(path) if path else "defaults")
    validate(settings, require_queue)
    return settings


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None


def _build_section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}", f"unknown key; allowed: {', '.join(hints)}")
        kwargs[key] = _coerce(f"{name}.{key}", hints[key], value)
    for key, hint in hints.items():
        env_name = f"{ENV_PREFIX}{name}_{key}".upper()
        if env_name in env:
            kwargs[key] = _coerce(f"{name}.{key} (from {env_name})", hint, _parse_env(hint, env[env_name]))
    if name == "telemetry" and not kwargs.get("connection_string"):
        kwargs["connection_string"] = env.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "")
    return cls(**kwargs)


def _parse_env(hint: Any, text: str) -> Any:
    """Environment values are strings; turn them into what the TOML would hold."""
    if hint is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off", ""):
            return False
        return text
    if typing.get_origin(hint) is tuple:
        return [part.strip() for part in text.split(",") if part.strip()]
    if hint in (int, float):
        try:
            return int(text) if hint is int else float(text)
        except ValueError:
            return text
    return text


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be a whole number, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, f"must be a list of strings, got {value!r}")
        return tuple(value)
    if origin is Mapping or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a table, got {value!r}")
        return value
    raise AssertionError(f"unhandled settings type {hint!r} for {key}")


def _require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(key, problem)


def validate(s: Settings, require_queue: bool = True) -> None:
    q = s.queue
    _require(bool(q.connection_string or q.account_url) or not require_queue, "queue.connection_string",
             "required: set queue.connection_string (keys, Azurite) or queue.account_url (managed identity)")
    _require(not (q.connection_string and q.account_url), "queue.account_url",
             "set either queue.connection_string or queue.account_url, not both")
    _require(not q.account_url or q.account_url.startswith(("https://", "http://")), "queue.account_url",
             f"must be an http(s) URL such as https://<account>.queue.core.windows.net, got {q.account_url!r}")
    _require(_valid_queue_name(q.name), "queue.name",
             f"must be 3-57 characters of lower-case letters, digits and single hyphens (the -poison suffix must fit 63), got {q.name!r}")
    _require(1 <= q.visibility_timeout_s <= MAX_VISIBILITY_TIMEOUT_S, "queue.visibility_timeout_s",
             f"must be between 1 and {MAX_VISIBILITY_TIMEOUT_S}, got {q.visibility_timeout_s}")
    _require(1 <= q.batch_size <= MAX_BATCH_SIZE, "queue.batch_size",
             f"must be between 1 and {MAX_BATCH_SIZE}, got {q.batch_size}")
    _require(q.max_dequeue_count >= 1, "queue.max_dequeue_count", f"must be at least 1, got {q.max_dequeue_count}")
    _require(q.message_encoding in ("none", "base64"), "queue.message_encoding",
             f"must be one of: none, base64; got {q.message_encoding!r}")
    _require(q.prefetch_s >= 0, "queue.prefetch_s", f"must be 0 (always batch_size) or more, got {q.prefetch_s}")
    for key in ("retry_delay_s", "retry_delay_max_s", "idle_poll_max_s", "request_timeout_s"):
        _require(getattr(q, key) > 0, f"queue.{key}", f"must be greater than 0, got {getattr(q, key)}")

    w = s.workload
    _require(_valid_handler_ref(w.handler), "workload.handler",
             f"must look like 'package.module:function', got {w.handler!r}")
    _require(w.mode in ("scale-out", "scale-up"), "workload.mode", f"must be one of: scale-out, scale-up; got {w.mode!r}")
    _validate_command(w.command)
    _require(w.stop_signal in _STOP_SIGNALS, "workload.stop_signal",
             f"must be a signal name such as SIGTERM, SIGINT, SIGUSR1; got {w.stop_signal!r}")
    _require(w.timeout_s >= 0, "workload.timeout_s", f"must be 0 (no limit) or more, got {w.timeout_s}")

    _validate_scaling("scaling", dataclasses.asdict(s.scaling))
    for vm_size, overrides in s.scaling.sku.items():
        _require(isinstance(overrides, dict), f"scaling.sku.{vm_size}", "must be a table of scaling keys")
        allowed = {f.name for f in dataclasses.fields(ScalingSettings)} - {"sku"}
        for key, value in overrides.items():
            _require(key in allowed, f"scaling.sku.{vm_size}.{key}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
            hint = typing.get_type_hints(ScalingSettings)[key]
            _coerce(f"scaling.sku.{vm_size}.{key}", hint, value)
        _validate_scaling(f"scaling.sku.{vm_size}", {**dataclasses.asdict(s.scaling), **overrides})

    e = s.events
    _require(e.source in ("azure", "none"), "events.source", f"must be one of: azure, none; got {e.source!r}")
    _require(e.endpoint.startswith(("http://", "https://")), "events.endpoint", f"must be an http URL, got {e.endpoint!r}")
    _require(e.poll_interval_s > 0, "events.poll_interval_s", f"must be greater than 0, got {e.poll_interval_s}")
    _require(e.request_timeout_s > 0, "events.request_timeout_s", f"must be greater than 0, got {e.request_timeout_s}")
    for event_type in e.drain_on:
        _require(event_type in EVENT_TYPES, "events.drain_on", f"unknown event type {event_type!r}; allowed: {', '.join(EVENT_TYPES)}")
    _require(e.safety_margin_s >= 0, "events.safety_margin_s", f"must be 0 or more, got {e.safety_margin_s}")
    _require(e.started_deadline_s > 0, "events.started_deadline_s", f"must be greater than 0, got {e.started_deadline_s}")
    _require(e.ack in ("sole", "always", "never"), "events.ack", f"must be one of: sole, always, never; got {e.ack!r}")

    _require(s.shutdown.drain_timeout_s > 0, "shutdown.drain_timeout_s", f"must be greater than 0, got {s.shutdown.drain_timeout_s}")
    _require(s.shutdown.kill_grace_s >= 0, "shutdown.kill_grace_s", f"must be 0 or more, got {s.shutdown.kill_grace_s}")
    _require(s.telemetry.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "telemetry.log_level",
             f"must be one of: DEBUG, INFO, WARNING, ERROR; got {s.telemetry.log_level!r}")
    _require(s.startup.arm_endpoint.startswith(("https://", "http://")), "startup.arm_endpoint",
             f"must be an http(s) URL, got {s.startup.arm_endpoint!r}")
    _require(s.startup.provisioning_timeout_s > 0, "startup.provisioning_timeout_s",
             f"must be greater than 0, got {s.startup.provisioning_timeout_s}")


def _validate_scaling(prefix: str, sc: Mapping[str, Any]) -> None:
    _require(sc["workers_per_core"] > 0, f"{prefix}.workers_per_core", f"must be greater than 0, got {sc['workers_per_core']}")
    _require(sc["threads_per_core"] >= 1, f"{prefix}.threads_per_core", f"must be at least 1, got {sc['threads_per_core']}")
    _require(sc["workers"] >= 0, f"{prefix}.workers", f"must be 0 (size to the VM) or more, got {sc['workers']}")
    _require(sc["min_workers"] >= 1, f"{prefix}.min_workers", f"must be at least 1, got {sc['min_workers']}")
    _require(sc["max_workers"] >= sc["min_workers"], f"{prefix}.max_workers",
             f"must be at least min_workers ({sc['min_workers']}), got {sc['max_workers']}")
    _require(sc["memory_per_worker_mb"] >= 0, f"{prefix}.memory_per_worker_mb",
             f"must be 0 (no memory limit) or more, got {sc['memory_per_worker_mb']}")


_STOP_SIGNALS = frozenset(s.name for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")
                          and s not in (signal.SIGKILL, signal.SIGSTOP))


def _validate_command(command: str) -> None:
    """Syntax only; whether the program exists is checked when the service starts (worker.program)."""
    if not command:
        return
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError("workload.command", f"cannot be split with shell rules ({exc}): {command!r}") from None
    _require(bool(argv), "workload.command", "is blank: leave it empty (\"\") to use workload.handler")


_QUEUE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")  # ASCII only: str.islower() accepts "ö"


def _valid_queue_name(name: str) -> bool:
    return (3 <= len(name) <= 57 and name[0] != "-" and name[-1] != "-" and "--" not in name
            and set(name) <= _QUEUE_NAME_CHARS)


def _valid_handler_ref(ref: str) -> bool:
    module, sep, attr = ref.partition(":")
    return bool(sep and attr and all(p.isidentifier() for p in module.split(".")) and all(p.isidentifier() for p in attr.split(".")))
