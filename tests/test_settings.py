"""Settings: config/default.toml documents exactly the dataclass defaults; env overrides; one-line errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib

from supervisor.config import (
    EventsSettings,
    ScalingSettings,
    StartupSettings,
    SupervisorSettings,
    load_supervisor_settings,
    unknown_env_variables,
)
from testsupport.harness import REPO
from worker.settings import SUPERVISOR_SECTIONS, ConfigError, QueueSettings, Settings, load_settings, section_types

SECTIONS = section_types(SupervisorSettings)

DEFAULT_TOML = REPO / "config" / "default.toml"
EX_CONFIG = 78
# Every settings object built here points away from the real IMDS address.
BASE_ENV = {"SPOT_QUEUE_CONNECTION_STRING": "UseDevelopmentStorage=true", "SPOT_EVENTS_SOURCE": "none"}


def load(tmp_path: Path, toml: str | None = None, **env: str) -> SupervisorSettings:
    path = None
    if toml is not None:
        path = tmp_path / "settings.toml"
        path.write_text(toml)
    return load_supervisor_settings(path, environ={**BASE_ENV, **env})


def config_error(tmp_path: Path, toml: str | None = None, **env: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, toml, **env)
    return info.value


def assert_one_line_naming(exc: ConfigError, key: str) -> None:
    text = str(exc)
    assert "\n" not in text and "\r" not in text, text
    assert exc.key == key, text
    assert key in text, text


# -- config/default.toml is the documentation of the defaults -------------------------------------


def _toml_value(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def test_default_toml_documents_exactly_the_dataclass_defaults() -> None:
    doc = tomllib.loads(DEFAULT_TOML.read_text())
    defaults = SupervisorSettings()
    assert set(doc) == set(SECTIONS), "sections differ between config/default.toml and the settings classes"
    for section in SECTIONS:
        fields = {f.name: getattr(getattr(defaults, section), f.name) for f in dataclasses.fields(getattr(defaults, section))}
        assert set(doc[section]) == set(fields), f"[{section}] keys differ between config/default.toml and the dataclass"
        for key, default in fields.items():
            documented = _toml_value(doc[section][key])
            assert documented == default and type(documented) is type(default), \
                f"{section}.{key}: config/default.toml says {documented!r}, the dataclass {default!r}"


def test_loading_default_toml_gives_the_defaults() -> None:
    loaded = load_supervisor_settings(DEFAULT_TOML, environ=BASE_ENV)
    expected = SupervisorSettings(queue=QueueSettings(connection_string=BASE_ENV["SPOT_QUEUE_CONNECTION_STRING"]),
                        events=EventsSettings(source="none"), source=str(DEFAULT_TOML))
    assert loaded == expected


# -- environment overrides ----------------------------------------------------------------------


def test_env_overrides_every_kind(tmp_path: Path) -> None:
    toml = '[queue]\nname = "from-file"\nbatch_size = 8\n[scaling]\nworkers = 2\n'
    s = load(tmp_path, toml,
             SPOT_QUEUE_NAME="from-env",                  # str, over the file
             SPOT_SCALING_WORKERS="4",                    # int, over the file
             SPOT_QUEUE_VISIBILITY_TIMEOUT_S="120",       # int
             SPOT_EVENTS_POLL_INTERVAL_S="0.5",           # float
             SPOT_SCALING_WORKERS_PER_CORE="2",           # float written as a whole number
             SPOT_STARTUP_WAIT_FOR_PROVISIONING="yes",    # bool
             SPOT_EVENTS_DRAIN_ON="Preempt, Terminate",   # list, comma-separated
             SPOT_EVENTS_ENDPOINT="http://127.0.0.1:9")   # str
    assert s.queue.name == "from-env"
    assert s.queue.batch_size == 8  # the file's value where no variable overrides it
    assert s.scaling.workers == 4
    assert s.queue.visibility_timeout_s == 120
    assert s.events.poll_interval_s == 0.5
    assert s.scaling.workers_per_core == 2.0 and isinstance(s.scaling.workers_per_core, float)
    assert s.startup.wait_for_provisioning is True
    assert s.events.drain_on == ("Preempt", "Terminate")
    assert s.events.endpoint == "http://127.0.0.1:9"
    assert s.events.source == "none"


@pytest.mark.parametrize(("text", "expected"), [("1", True), ("true", True), ("ON", True), ("0", False),
                                                ("false", False), ("no", False), ("off", False)])
def test_env_bool_spellings(tmp_path: Path, text: str, expected: bool) -> None:
    assert load(tmp_path, SPOT_STARTUP_WAIT_FOR_PROVISIONING=text).startup.wait_for_provisioning is expected


def test_applicationinsights_connection_string_from_its_own_variable(tmp_path: Path) -> None:
    assert load(tmp_path, APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x").telemetry.connection_string \
        == "InstrumentationKey=x"
    assert load(tmp_path, APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=x",
                SPOT_TELEMETRY_CONNECTION_STRING="InstrumentationKey=y").telemetry.connection_string == "InstrumentationKey=y"


# -- bad values: one line, naming the key ---------------------------------------------------------


@pytest.mark.parametrize(("toml", "env", "key"), [
    # wrong type, from the file
    ("[queue]\nbatch_size = 1.5\n", {}, "queue.batch_size"),
    ("[queue]\nbatch_size = true\n", {}, "queue.batch_size"),
    ("[queue]\nretry_delay_s = \"2\"\n", {}, "queue.retry_delay_s"),
    ("[startup]\nwait_for_provisioning = 1\n", {}, "startup.wait_for_provisioning"),
    ("[events]\ndrain_on = \"Preempt\"\n", {}, "events.drain_on"),
    ("[events]\ndrain_on = [1, 2]\n", {}, "events.drain_on"),
    ("[queue]\nname = 5\n", {}, "queue.name"),
    ("[scaling]\nsku = 5\n", {}, "scaling.sku"),
    ("queue = 5\n", {}, "queue"),
    # wrong type, from the environment
    (None, {"SPOT_SCALING_WORKERS": "four"}, "scaling.workers (from SPOT_SCALING_WORKERS)"),
    (None, {"SPOT_EVENTS_POLL_INTERVAL_S": "fast"}, "events.poll_interval_s (from SPOT_EVENTS_POLL_INTERVAL_S)"),
    (None, {"SPOT_STARTUP_WAIT_FOR_PROVISIONING": "maybe"},
     "startup.wait_for_provisioning (from SPOT_STARTUP_WAIT_FOR_PROVISIONING)"),
    # unknown names
    ("[queue]\nbatch = 4\n", {}, "queue.batch"),
    ("[queues]\nname = \"x\"\n", {}, "queues"),
    ("[scaling.sku.Standard_D2s_v3]\nthreads = 2\n", {}, "scaling.sku.Standard_D2s_v3.threads"),
    # allowed values and ranges
    ("[queue]\nbatch_size = 33\n", {}, "queue.batch_size"),
    ("[queue]\nbatch_size = 0\n", {}, "queue.batch_size"),
    ("[queue]\nvisibility_timeout_s = 0\n", {}, "queue.visibility_timeout_s"),
    ("[queue]\nmax_dequeue_count = 0\n", {}, "queue.max_dequeue_count"),
    ("[queue]\nmessage_encoding = \"utf-8\"\n", {}, "queue.message_encoding"),
    ("[queue]\nretry_delay_s = 0\n", {}, "queue.retry_delay_s"),
    ("[workload]\nhandler = \"no-colon\"\n", {}, "workload.handler"),
    ("[workload]\nmode = \"sideways\"\n", {}, "workload.mode"),
    ("[events]\nsource = \"ec2\"\n", {"SPOT_EVENTS_SOURCE": "ec2"}, "events.source"),
    ("[events]\non_rebalance = \"maybe\"\n", {}, "events.on_rebalance"),
    ("[events]\ndmi_dir = \"\"\n", {}, "events.dmi_dir"),
    ("[events]\ndrain_on = [\"Preempt\", \"Evict\"]\n", {}, "events.drain_on"),
    ("[events]\nack = \"sometimes\"\n", {}, "events.ack"),
    ("[events]\nendpoint = \"169.254.169.254\"\n", {}, "events.endpoint"),
    ("[scaling]\nmin_workers = 4\nmax_workers = 2\n", {}, "scaling.max_workers"),
    ("[scaling.sku.Standard_D2s_v3]\nworkers_per_core = 0.0\n", {}, "scaling.sku.Standard_D2s_v3.workers_per_core"),
    ("[telemetry]\nlog_level = \"LOUD\"\n", {}, "telemetry.log_level"),
    ("[shutdown]\ndrain_timeout_s = -1.0\n", {}, "shutdown.drain_timeout_s"),
    ("[queue]\naccount_url = \"https://a.queue.core.windows.net\"\n", {}, "queue.account_url"),  # and a connection string
    (None, {"SPOT_QUEUE_CONNECTION_STRING": ""}, "queue.connection_string"),
    ("[queue\nname = \"x\"\n", {}, "--config"),  # not TOML
])
def test_bad_value_is_one_line_naming_the_key(tmp_path: Path, toml: str | None, env: dict[str, str], key: str) -> None:
    assert_one_line_naming(config_error(tmp_path, toml, **env), key)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_supervisor_settings(tmp_path / "nope.toml", environ=BASE_ENV)
    assert_one_line_naming(info.value, "--config")
    assert "nope.toml" in str(info.value)


@pytest.mark.parametrize("name", ["abc", "a-b-c", "jobs9", "9jobs", "a" * 57])
def test_queue_name_accepted(tmp_path: Path, name: str) -> None:
    assert load(tmp_path, SPOT_QUEUE_NAME=name).queue.name == name


@pytest.mark.parametrize("name", ["ab", "a" * 58, "Jobs", "a--b", "-abc", "abc-", "a_b", "jobs!", "jöbs", "jobs\u0663", ""])
def test_queue_name_rejected(tmp_path: Path, name: str) -> None:
    assert_one_line_naming(config_error(tmp_path, SPOT_QUEUE_NAME=name), "queue.name")


@pytest.mark.parametrize("size", [1, 32])
def test_batch_size_limits_accepted(tmp_path: Path, size: int) -> None:
    assert load(tmp_path, SPOT_QUEUE_BATCH_SIZE=str(size)).queue.batch_size == size


def test_sku_overrides_are_kept(tmp_path: Path) -> None:
    s = load(tmp_path, "[scaling.sku.Standard_D2s_v3]\nworkers_per_core = 2.0\n")
    assert s.scaling.sku == {"Standard_D2s_v3": {"workers_per_core": 2.0}}
    assert isinstance(s.scaling, ScalingSettings) and isinstance(s.startup, StartupSettings)


# -- the commands exit 78 with one line ----------------------------------------------------------


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_") and k != "APPLICATIONINSIGHTS_CONNECTION_STRING"}
    return {**env, **BASE_ENV, "PYTHONPATH": str(REPO), **extra}


BAD_CONFIGS = {
    "batch_size": ("[queue]\nbatch_size = 33\n", "queue.batch_size"),
    "unknown_key": ("[queue]\nnaem = \"jobs\"\n", "queue.naem"),
    "unknown_section": ("[queues]\nname = \"jobs\"\n", "queues"),
    # The supervisor's sections: only the supervisor reads (and so checks) them.
    "unknown_supervisor_key": ("[events]\nsourc = \"none\"\n", "events.sourc"),
}
COMMANDS = {
    "worker": [sys.executable, "-m", "worker", "--config"],
    "supervisor": [sys.executable, "-m", "supervisor", "run", "--config"],
}
CASES = [(command, bad) for command in sorted(COMMANDS) for bad in sorted(BAD_CONFIGS)
         if not (command == "worker" and bad == "unknown_supervisor_key")]


@pytest.mark.parametrize(("command", "bad"), CASES)
def test_bad_config_exits_78_with_one_line(tmp_path: Path, command: str, bad: str) -> None:
    toml, key = BAD_CONFIGS[bad]
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    result = subprocess.run([*COMMANDS[command], str(path)], env=_clean_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_worker_with_unimportable_handler_exits_78(tmp_path: Path) -> None:
    path = tmp_path / "handler.toml"
    path.write_text('[workload]\nhandler = "no_such_module_here:handle"\n')
    # A closed local port: the handler is imported before the queue is ever contacted.
    env = _clean_env(SPOT_QUEUE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                     "AccountKey=a2V5;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;")
    result = subprocess.run([sys.executable, "-m", "worker", "--config", str(path)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "workload.handler" in result.stderr and "no_such_module_here" in result.stderr


# -- each side reads its own sections from the one file -----------------------------------------


def test_worker_and_supervisor_sections_are_in_step() -> None:
    worker_sections = set(section_types(Settings))
    assert worker_sections | set(SUPERVISOR_SECTIONS) == set(SECTIONS)
    assert not worker_sections & set(SUPERVISOR_SECTIONS)


def test_worker_settings_accept_the_supervisors_sections_unread(tmp_path: Path) -> None:
    path = tmp_path / "both.toml"
    path.write_text(DEFAULT_TOML.read_text() + '\n[scaling.sku.Standard_D2s_v3]\nworkers = 3\n')
    settings = load_settings(path, environ={**BASE_ENV, "SPOT_QUEUE_NAME": "jobs"})
    assert type(settings) is Settings and settings.queue.name == "jobs"
    with pytest.raises(ConfigError) as info:
        load_settings(None, environ={**BASE_ENV, "SPOT_QUEUE_BATCH_SIZE": "33"})
    assert "queue.batch_size" in str(info.value)


def test_a_forked_worker_gets_the_supervisors_settings_as_its_own(tmp_path: Path) -> None:
    s = load(tmp_path, SPOT_QUEUE_NAME="jobs", SPOT_SCALING_WORKERS="2")
    assert isinstance(s, Settings) and s.queue.name == "jobs" and s.scaling.workers == 2


# -- unknown SPOT_<SECTION>_<KEY> variables are named at start -------------------------------


def test_unknown_env_variables_are_named() -> None:
    env = {"SPOT_QUEUE_NAEM": "jobs", "SPOT_QUEUE_NAME": "jobs", "SPOT_EVENTS_POLL_INTERVAL": "2",
           "SPOT_SAMPLE_RESULTS": "/tmp/x", "SPOT_CGROUP_ROOT": "/sys/fs/cgroup", "PATH": "/bin"}
    warnings = unknown_env_variables(SupervisorSettings, env)
    assert len(warnings) == 2, warnings
    assert "SPOT_EVENTS_POLL_INTERVAL" in warnings[0] and "did you mean SPOT_EVENTS_POLL_INTERVAL_S" in warnings[0]
    assert "SPOT_QUEUE_NAEM" in warnings[1] and "did you mean SPOT_QUEUE_NAME" in warnings[1]


def test_plan_warns_about_an_unknown_variable_by_name(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "supervisor", "plan", "--json"],
                            env=_clean_env(SPOT_QUEUE_NAEM="jobs", SPOT_SCALING_WORKERS="2"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "SPOT_QUEUE_NAEM" in line]
    assert len(warnings) == 1 and "WARNING" in warnings[0], result.stderr
    assert "SPOT_SCALING_WORKERS" not in result.stderr


def test_plan_imports_no_consumer_code(tmp_path: Path) -> None:
    probe = ("import sys\n"
             "from supervisor import cli\n"
             "code = cli.main(['plan', '--json'])\n"
             "heavy = sorted(m for m in sys.modules if m in ('worker.process', 'worker.runtime', 'worker.queue.consumer',\n"
             "               'worker.queue.client', 'worker.queue.lease', 'supervisor.pool.arbiter') or m.startswith('azure.storage'))\n"
             "print('LOADED', heavy, file=sys.stderr)\n"
             "sys.exit(code)\n")
    result = subprocess.run([sys.executable, "-c", probe], env=_clean_env(), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stderr, result.stderr


# -- numbers: finite and bounded, so nothing overflows later (issue 16, defect 8) ----------------


def _float_keys() -> list[tuple[str, str]]:
    return [(section, f.name) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.type in (float, "float")]


def test_there_are_float_keys_to_check() -> None:
    assert ("events", "poll_interval_s") in _float_keys() and ("shutdown", "drain_timeout_s") in _float_keys()


@pytest.mark.parametrize(("section", "key"), _float_keys())
@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300"])
def test_every_float_key_refuses_infinite_and_huge_values(tmp_path: Path, section: str, key: str, value: str) -> None:
    exc = config_error(tmp_path, **{f"SPOT_{section}_{key}".upper(): value})
    assert exc.key.startswith(f"{section}.{key}"), exc
    assert "\n" not in str(exc)


@pytest.mark.parametrize("toml", ["[shutdown]\ndrain_timeout_s = inf\n", "[events]\npoll_interval_s = nan\n",
                                  "[scaling.sku.Standard_D2s_v3]\nrespawn_delay_max_s = 1e300\n"])
def test_toml_infinities_are_refused_too(tmp_path: Path, toml: str) -> None:
    exc = config_error(tmp_path, toml)
    assert "\n" not in str(exc) and exc.key.split(".")[0] in ("shutdown", "events", "scaling")


def test_the_bounds_leave_room_for_real_values(tmp_path: Path) -> None:
    s = load(tmp_path, SPOT_SHUTDOWN_DRAIN_TIMEOUT_S="3600", SPOT_EVENTS_POLL_INTERVAL_S="0.25",
             SPOT_STARTUP_PROVISIONING_TIMEOUT_S="7200", SPOT_QUEUE_RETRY_DELAY_MAX_S="86400")
    assert (s.shutdown.drain_timeout_s, s.events.poll_interval_s) == (3600.0, 0.25)


# -- connection strings the Storage SDK would reject in every worker -----------------------------

AZURITE_STYLE = ("DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
                 "QueueEndpoint=http://127.0.0.1:10001/devstoreaccount1;")


@pytest.mark.parametrize("text", [
    "UseDevelopmentStorage=true",
    AZURITE_STYLE,
    "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=a2V5;EndpointSuffix=core.windows.net",
    "QueueEndpoint=https://acct.queue.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=abc%3D",
])
def test_connection_strings_accepted(tmp_path: Path, text: str) -> None:
    assert load(tmp_path, SPOT_QUEUE_CONNECTION_STRING=text).queue.connection_string == text


@pytest.mark.parametrize("text", [
    "not a connection string",
    "AccountName=acct;garbage",
    "AccountKey=a2V5",                                       # no account
    "AccountName=acct",                                      # no credential
    "AccountName=acct;AccountKey=not base64!",
    "DefaultEndpointsProtocol=ftp;AccountName=acct;AccountKey=a2V5",
    "QueueEndpoint=acct.queue.core.windows.net;SharedAccessSignature=sig",
])
def test_connection_strings_refused_at_load(tmp_path: Path, text: str) -> None:
    exc = config_error(tmp_path, SPOT_QUEUE_CONNECTION_STRING=text)
    assert_one_line_naming(exc, "queue.connection_string")
    assert text not in str(exc)  # it may hold a key


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_unparseable_connection_string_exits_78_not_a_crash_loop(tmp_path: Path, command: str) -> None:
    result = subprocess.run([*COMMANDS[command], str(DEFAULT_TOML)], cwd=tmp_path, capture_output=True, text=True,
                            env=_clean_env(SPOT_QUEUE_CONNECTION_STRING="AccountName=acct;garbage"), timeout=30)
    assert result.returncode == EX_CONFIG, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "queue.connection_string" in lines[0], result.stderr


# -- a handler module that calls sys.exit() while being imported ---------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_handler_calling_sys_exit_at_import_exits_78(tmp_path: Path, command: str) -> None:
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n\ndef handle(message, ctx):\n    pass\n")
    env = _clean_env(SPOT_QUEUE_CONNECTION_STRING="DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
                     "AccountKey=a2V5;QueueEndpoint=http://127.0.0.1:9/devstoreaccount1;",
                     SPOT_WORKLOAD_HANDLER="exits_at_import:handle", SPOT_SCALING_WORKERS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run([*COMMANDS[command], str(DEFAULT_TOML)], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EX_CONFIG, result.stderr
    assert "workload.handler" in result.stderr and "sys.exit(3)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
