"""Typed settings: TOML file, then `SPOT_<SECTION>_<KEY>` environment overrides.

Two parts. The generic loader (`build_settings`: TOML, environment overrides,
type coercion, one-line errors) serves both sides. The sections a worker reads
(queue, workload, shutdown, telemetry) are defined here; the supervisor's own
sections live in supervisor/config.py, whose `SupervisorSettings` extends
`Settings`, so one file configures both and a forked worker gets its part as is.
Every key and its default is documented in config/default.toml; a test keeps
the two in step.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import math
import os
import shlex
import signal
import sys
import typing
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "SPOT_"
MAX_MESSAGES_PER_CALL = 32  # the Queue service's limit for one Get Messages or Peek Messages call
MAX_OUTSTANDING_SETTLES = 8  # a queue client pools 10 connections: settles, a receive ahead and a renewal fit
MAX_VISIBILITY_TIMEOUT_S = 7 * 24 * 3600
HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
# Sections only `spot-supervisor` reads (supervisor/config.py); `python -m worker` accepts them unread.
SUPERVISOR_SECTIONS = ("scaling", "events", "startup", "cost", "fleet")


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
    batch_size: int = MAX_MESSAGES_PER_CALL
    prefetch_s: float = 2.0
    max_outstanding_settles: int = 8
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
class ShutdownSettings:
    drain_timeout_s: float = 30.0
    kill_grace_s: float = 3.0


@dataclass(frozen=True)
class TelemetrySettings:
    connection_string: str = ""
    service_name: str = "spot-supervisor"
    log_level: str = "INFO"


@dataclass(frozen=True)
class Settings:
    """What a worker process reads. `shutdown` is here because `python -m worker` drains on SIGTERM too."""

    queue: QueueSettings = field(default_factory=QueueSettings)
    workload: WorkloadSettings = field(default_factory=WorkloadSettings)
    shutdown: ShutdownSettings = field(default_factory=ShutdownSettings)
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    source: str = "defaults"


SettingsT = TypeVar("SettingsT", bound=Settings)


def section_types(schema: type[Settings]) -> dict[str, type]:
    """{section name: section dataclass} of a settings class (every field but `source`)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if f.name != "source"}


SECTIONS = section_types(Settings)


def load_settings(path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None,
                  require_queue: bool = True) -> Settings:
    """A worker's settings: the TOML file (if any), environment overrides, validated.

    The file may hold the supervisor's sections too (one file configures both); they are not read here."""
    settings = build_settings(Settings, path, environ, other_sections=SUPERVISOR_SECTIONS)
    validate(settings, require_queue)
    return settings


def build_settings(schema: type[SettingsT], path: str | os.PathLike[str] | None, environ: Mapping[str, str] | None,
                   other_sections: Collection[str] = ()) -> SettingsT:
    """The generic loader: read the TOML file, apply SPOT_<SECTION>_<KEY> variables, coerce types.

    Unknown sections and keys are errors, except whole sections named in other_sections (read by
    another program). Value checks beyond the type are the caller's (`validate`)."""
    env = os.environ if environ is None else environ
    sections = section_types(schema)
    raw: dict[str, Any] = _read_toml(Path(path)) if path is not None else {}
    for section in raw:
        if section not in sections and section not in other_sections:
            raise ConfigError(section, f"unknown section; allowed: {', '.join([*sections, *other_sections])}")
        if not isinstance(raw[section], dict):
            raise ConfigError(section, "must be a table")
    values = {name: _build_section(name, cls, raw.get(name, {}), env) for name, cls in sections.items()}
    return schema(**values, source=str(path) if path else "defaults")


def unknown_env_variables(schema: type[Settings], environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning line per SPOT_<SECTION>_<KEY> variable whose section is known but whose key is not
    (a typo such as SPOT_QUEUE_NAEM would otherwise be ignored without a word)."""
    env = os.environ if environ is None else environ
    known: dict[str, list[str]] = {}
    for name, cls in section_types(schema).items():
        known[f"{ENV_PREFIX}{name}_".upper()] = [f"{ENV_PREFIX}{name}_{f.name}".upper() for f in dataclasses.fields(cls)]
    warnings = []
    for variable in sorted(env):
        for prefix, names in known.items():
            if variable.startswith(prefix) and variable not in names:
                close = difflib.get_close_matches(variable, names, n=1)
                hint = f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(names)}"
                warnings.append(f"environment variable {variable} names no setting and is ignored{hint}")
    return warnings


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
    except UnicodeDecodeError as exc:  # TOML is UTF-8; tomllib lets this one through as it is
        raise ConfigError("--config", f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _build_section(name: str, cls: type, table: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}", f"unknown key; allowed: {', '.join(hints)}")
        kwargs[key] = coerce(f"{name}.{key}", hints[key], value)
    for key, hint in hints.items():
        env_name = f"{ENV_PREFIX}{name}_{key}".upper()
        if env_name in env:
            kwargs[key] = coerce(f"{name}.{key} (from {env_name})", hint, _parse_env(hint, env[env_name]))
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


def coerce(key: str, hint: Any, value: Any) -> Any:
    """`value` as the type `hint` names, or ConfigError naming `key`."""
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
        if not math.isfinite(value):  # inf would overflow every sleep and timeout it reaches
            raise ConfigError(key, f"must be a finite number, got {value!r}")
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


def require(condition: bool, key: str, problem: str) -> None:
    if not condition:
        raise ConfigError(key, problem)


def require_between(value: float, key: str, low: float, high: float, *, low_inclusive: bool = True, note: str = "") -> None:
    """low <= value <= high (low < value without low_inclusive). Every number has an upper bound,
    so that a huge value cannot overflow a sleep or a timeout later."""
    if (value >= low if low_inclusive else value > low) and value <= high:
        return
    allowed = f"between {low:g} and {high:g}" if low_inclusive else f"greater than {low:g} and at most {high:g}"
    raise ConfigError(key, f"must be {allowed}{note}, got {value:g}")


def validate(s: Settings, require_queue: bool = True) -> None:
    """The worker's sections. require_queue=False is for commands that never touch the queue (`plan`)."""
    q = s.queue
    require(bool(q.connection_string or q.account_url) or not require_queue, "queue.connection_string",
            "required: set queue.connection_string (keys, Azurite) or queue.account_url (managed identity)")
    require(not (q.connection_string and q.account_url), "queue.account_url",
            "set either queue.connection_string or queue.account_url, not both")
    require(not q.account_url or http_url_problem(q.account_url) is None, "queue.account_url",
            f"must be an http(s) URL with a host, such as https://<account>.queue.core.windows.net, got {q.account_url!r}")
    require(_valid_queue_name(q.name), "queue.name",
            f"must be 3-57 characters of lower-case letters, digits and single hyphens (the -poison suffix must fit 63), got {q.name!r}")
    require(1 <= q.visibility_timeout_s <= MAX_VISIBILITY_TIMEOUT_S, "queue.visibility_timeout_s",
            f"must be between 1 and {MAX_VISIBILITY_TIMEOUT_S}, got {q.visibility_timeout_s}")
    require(1 <= q.batch_size <= MAX_MESSAGES_PER_CALL, "queue.batch_size",
            f"must be between 1 and {MAX_MESSAGES_PER_CALL}, got {q.batch_size}")
    require(q.max_dequeue_count >= 1, "queue.max_dequeue_count", f"must be at least 1, got {q.max_dequeue_count}")
    require(q.message_encoding in ("none", "base64"), "queue.message_encoding",
            f"must be one of: none, base64; got {q.message_encoding!r}")
    require_between(q.prefetch_s, "queue.prefetch_s", 0, HOUR_S, note=" (0 = always batch_size)")
    require(1 <= q.max_outstanding_settles <= MAX_OUTSTANDING_SETTLES, "queue.max_outstanding_settles",
            f"must be between 1 and {MAX_OUTSTANDING_SETTLES}, got {q.max_outstanding_settles}")
    require_between(q.retry_delay_s, "queue.retry_delay_s", 0, MAX_VISIBILITY_TIMEOUT_S, low_inclusive=False)
    require_between(q.retry_delay_max_s, "queue.retry_delay_max_s", 0, MAX_VISIBILITY_TIMEOUT_S, low_inclusive=False)
    require_between(q.idle_poll_max_s, "queue.idle_poll_max_s", 0, HOUR_S, low_inclusive=False)
    require_between(q.request_timeout_s, "queue.request_timeout_s", 0, HOUR_S, low_inclusive=False)
    problem = connection_string_problem(q.connection_string) if q.connection_string else None
    require(problem is None, "queue.connection_string", f"{problem} (the secret itself is not shown)")
    require(not q.api_version or _sdk_knows_api_version(q.api_version), "queue.api_version",
            f"the Storage SDK does not know {q.api_version!r}; leave it empty for the SDK's newest, or pin a "
            "version it lists, such as 2019-02-02")

    w = s.workload
    require(_valid_handler_ref(w.handler), "workload.handler",
            f"must look like 'package.module:function', got {w.handler!r}")
    require(w.mode in ("scale-out", "scale-up"), "workload.mode", f"must be one of: scale-out, scale-up; got {w.mode!r}")
    _validate_command(w.command)
    require(w.stop_signal in _STOP_SIGNALS, "workload.stop_signal",
            f"must be a signal name such as SIGTERM, SIGINT, SIGUSR1; got {w.stop_signal!r}")
    require_between(w.timeout_s, "workload.timeout_s", 0, 7 * DAY_S, note=" (0 = no limit)")

    require_between(s.shutdown.drain_timeout_s, "shutdown.drain_timeout_s", 0, DAY_S, low_inclusive=False)
    require_between(s.shutdown.kill_grace_s, "shutdown.kill_grace_s", 0, HOUR_S)
    require(s.telemetry.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "telemetry.log_level",
            f"must be one of: DEBUG, INFO, WARNING, ERROR; got {s.telemetry.log_level!r}")


_STOP_SIGNALS = frozenset(s.name for s in signal.Signals if s.name.startswith("SIG") and not s.name.startswith("SIG_")
                          and s not in (signal.SIGKILL, signal.SIGSTOP))


def _validate_command(command: str) -> None:
    """Syntax only; whether the program exists is checked when the service starts (worker.programs.runner)."""
    if not command:
        return
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError("workload.command", f"cannot be split with shell rules ({exc}): {command!r}") from None
    require(bool(argv), "workload.command", "is blank: leave it empty (\"\") to use workload.handler")


def http_url_problem(url: str) -> str | None:
    """Why `url` is not an http(s) URL with a host and a valid port, or None."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return "contains spaces or control characters"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number or out of range
    except ValueError as exc:
        return f"cannot be parsed ({exc})"
    if parts.scheme not in ("http", "https"):
        return "is not an http(s) URL"
    if not parts.hostname:
        return "has no host"
    return None


def _sdk_knows_api_version(version: str) -> bool:
    """Whether the Storage SDK accepts this API version (it refuses unknown ones when a client is built, in
    every worker: here the refusal becomes one configuration error)."""
    from azure.storage.queue import QueueClient

    try:
        QueueClient("https://account.queue.core.windows.net", "q", api_version=version)
    except ValueError:
        return False
    return True


def connection_string_problem(text: str) -> str | None:
    """Why the Storage SDK would reject this connection string (in every worker, at every start), or None.

    The SDK's own rules: `Key=Value` pairs separated by ";"; UseDevelopmentStorage=true alone suffices;
    otherwise an account name or a QueueEndpoint, and an AccountKey (base64) or a SharedAccessSignature."""
    pairs = [part.split("=", 1) for part in text.strip().rstrip(";").split(";")]
    if any(len(pair) != 2 or not pair[0].strip() for pair in pairs):
        return "is not a list of Key=Value pairs separated by ';'"
    values = {key.strip().upper(): value.strip() for key, value in pairs}
    if values.get("USEDEVELOPMENTSTORAGE") == "true":
        return None
    endpoint = values.get("QUEUEENDPOINT", "")
    if endpoint and http_url_problem(endpoint) is not None:
        return "QueueEndpoint must be an http(s) URL with a host"
    if values.get("DEFAULTENDPOINTSPROTOCOL", "https") not in ("http", "https"):
        return "DefaultEndpointsProtocol must be http or https"
    if not (values.get("ACCOUNTNAME") or endpoint):
        return "has neither AccountName nor QueueEndpoint"
    if "ACCOUNTKEY" in values:
        if not values.get("ACCOUNTNAME"):
            return "has an AccountKey but no AccountName"
        try:
            base64.b64decode(values["ACCOUNTKEY"], validate=True)
        except (binascii.Error, ValueError):
            return "AccountKey is not base64"
    elif not values.get("SHAREDACCESSSIGNATURE"):
        return "has neither AccountKey nor SharedAccessSignature"
    return None


_QUEUE_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")  # ASCII only: str.islower() accepts "ö"


def _valid_queue_name(name: str) -> bool:
    return (3 <= len(name) <= 57 and name[0] != "-" and name[-1] != "-" and "--" not in name
            and set(name) <= _QUEUE_NAME_CHARS)


def _valid_handler_ref(ref: str) -> bool:
    module, sep, attr = ref.partition(":")
    return bool(sep and attr and all(p.isidentifier() for p in module.split(".")) and all(p.isidentifier() for p in attr.split(".")))
