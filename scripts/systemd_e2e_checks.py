"""The checks of the systemd end-to-end test, in order (each starts from the state
the one before left). Each returns the journal lines it rests on; every verdict
comes from systemctl or journalctl inside the container.
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any, Callable, Protocol

from azure.storage.queue import QueueClient
from nspawn_container import Container

UNIT = "spot-supervisor.service"
OPT = "/opt/spot-supervisor"
ETC = "/etc/spot-supervisor"
DROP_IN = f"/etc/systemd/system/{UNIT}.d/e2e.conf"
RESTART_SEC = 5.0  # the unit's RestartSec=
PRIORITY_NAMES = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
ERR, WARNING, INFO = 3, 4, 6


class CheckFailed(Exception):
    pass


class Imds(Protocol):
    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any: ...


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


class Service:
    """The unit inside the container, and the host's side of its queue and IMDS."""

    def __init__(self, container: Container, queue: QueueClient, imds: Imds, env: str, v1: str, v2: str, vm_name: str) -> None:
        self.c, self.queue, self.imds, self.env, self.v1, self.v2, self.vm_name = container, queue, imds, env, v1, v2, vm_name
        self.cursor = ""

    def show(self, *names: str) -> dict[str, str]:
        out = self.c.run("systemctl", "show", UNIT, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def prop(self, name: str) -> str:
        return self.show(name).get(name, "")

    def mark(self) -> None:
        """Journal lines from here on are this check's."""
        out = self.c.run("journalctl", "-n", "1", "-o", "json", "--no-pager", check=False).stdout.strip()
        self.cursor = json.loads(out.splitlines()[-1])["__CURSOR"] if out else ""

    def entries(self, boot: str | None = None) -> list[dict[str, Any]]:
        """The unit's journal entries since mark() (or of one boot). Filtered here, not by journalctl:
        systemd 252's journalctl skips the first match after --after-cursor when given -u or -p."""
        argv = ["journalctl", "--no-pager", "-q", "-o", "json"]
        if boot is not None:
            argv.append(f"--boot={boot}")
        elif self.cursor:
            argv.append(f"--after-cursor={self.cursor}")
        entries = [json.loads(line) for line in self.c.run(*argv).stdout.splitlines() if line.startswith("{")]
        return [e for e in entries if UNIT in (e.get("_SYSTEMD_UNIT"), e.get("UNIT")) and isinstance(e.get("MESSAGE"), str)]

    def journal(self, max_priority: int = 7, boot: str | None = None, last: int = 0) -> list[str]:
        """Lines like `01:07:19.517664 spot-supervisor[358] <warning> supervisor[358] ...: drain deadline reached`."""
        lines = []
        for e in self.entries(boot):
            priority = int(e.get("PRIORITY", 6))
            if priority <= max_priority:
                when = time.strftime("%H:%M:%S", time.gmtime(int(e["__REALTIME_TIMESTAMP"]) / 1e6))
                micros = int(e["__REALTIME_TIMESTAMP"]) % 1_000_000
                who = f"{e.get('SYSLOG_IDENTIFIER', '?')}[{e.get('_PID', '?')}]"
                lines.append(f"{when}.{micros:06d} {who} <{PRIORITY_NAMES[priority]}> {e['MESSAGE']}")
        return lines[-last:] if last else lines

    def recent_journal(self) -> list[str]:
        try:
            return self.journal(last=25)
        except RuntimeError as exc:
            return [f"(no journal: {exc})"]

    def wait(self, what: str, predicate: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)

    def wait_active(self, timeout: float = 90) -> None:
        self.wait("the unit active", lambda: self.prop("ActiveState") == "active", timeout)

    def wait_stopped(self, timeout: float = 90, states: tuple[str, ...] = ("inactive", "failed")) -> dict[str, str]:
        """A restart passes through inactive: wait for "failed" alone when that is what is expected."""
        self.wait(f"the unit {' or '.join(states)}", lambda: self.prop("ActiveState") in states, timeout)
        return self.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode", "NRestarts", "MainPID")

    def wait_log(self, text: str, max_priority: int = 7, timeout: float = 60) -> list[str]:
        """The journal lines (since mark) that contain `text`, once there is one."""
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.journal(max_priority) if text in line]
            return bool(found)

        self.wait(f"'{text}' in the journal", seen, timeout)
        return found

    def grep(self, text: str, max_priority: int = 7) -> list[str]:
        return [line for line in self.journal(max_priority) if text in line]

    def sh(self, script: str, check: bool = True) -> str:
        return self.c.sh(script, timeout=180, check=check)

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.sh(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && install -m {mode} /dev/stdin {shlex.quote(path)} <<'EOF'\n{text}EOF")

    def orchestrate(self, package: str, *args: str) -> str:
        return self.sh(f"bash /root/{package}/orchestrate.sh {' '.join(args)} 2>&1")

    def enqueue(self, *bodies: str) -> None:
        for body in bodies:
            self.queue.send_message(body)

    def queue_empty(self) -> bool:
        return self.queue.get_queue_properties().approximate_message_count == 0

    def workers(self) -> list[int]:
        main = self.prop("MainPID")
        return [int(p) for p in self.sh(f"pgrep -P {main} || true").split()]

    def not_restarted_after(self, restarts: str) -> None:
        time.sleep(RESTART_SEC + 1.5)  # past RestartSec=: a restart would have been scheduled by now
        expect(self.prop("NRestarts") == restarts, f"NRestarts went from {restarts} to {self.prop('NRestarts')}")
        expect(not self.grep("Scheduled restart job"), "systemd scheduled a restart")


# --- the checks -------------------------------------------------------------------------------


def install_without_a_queue_fails_78_once(s: Service) -> list[str]:
    """orchestrate.sh -i, the real path; the default config names no queue: status 78, never restarted."""
    s.mark()
    out = s.orchestrate("pkg-v1", "-i")
    expect(f"{s.v1} installed and current" in out, f"orchestrate.sh -i said: {out}")
    state = s.wait_stopped(states=("failed",))
    expect(state["ExecMainStatus"] == "78" and state["Result"] == "exit-code", f"expected status 78, got {state}")
    s.not_restarted_after(state["NRestarts"])
    expect(s.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled", "the unit is not enabled")
    perms = s.sh(f"stat -c '%n %a %U:%G' {ETC} {ETC}/config.toml {ETC}/env; id spot-supervisor").splitlines()
    expect(perms[1:3] == [f"{ETC}/config.toml 640 root:spot-supervisor", f"{ETC}/env 640 root:spot-supervisor"], f"{perms}")
    errors = s.grep("config error", ERR)
    raw = [e for e in s.entries() if "config error" in e["MESSAGE"]]
    expect(any("config error: queue." in e for e in errors), f"no configuration error at priority err: {raw}")
    return [*out.splitlines(), *perms, *errors, *s.grep("status=78")]


def configured_it_is_ready_sandboxed_and_processes(s: Service) -> list[str]:
    s.write(f"{ETC}/env", s.env, "0640")
    s.mark()
    s.sh(f"systemctl restart --no-block {UNIT}")
    s.wait_active()
    p = s.show("Type", "MainPID", "StatusText", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic", "User")
    expect(p["Type"] == "notify", f"Type={p['Type']}")
    # Type=notify: active only once READY=1 came, after the workers were up: not at the fork.
    expect(int(p["ActiveEnterTimestampMonotonic"]) > int(p["ExecMainStartTimestampMonotonic"]), f"{p}")
    ready = s.wait_log("ready: 2 worker(s) running")
    started = s.wait_log("Started spot-supervisor.service")
    status = s.sh(f"grep -E '^(Uid|Gid|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/{p['MainPID']}/status")
    fields = dict(line.split(":", 1) for line in status.splitlines())
    uid = s.sh("id -u spot-supervisor").strip()
    expect(fields["Uid"].split() == [uid] * 4, f"not running as spot-supervisor ({uid}): {fields['Uid']}")
    expect(all(int(fields[c], 16) == 0 for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), f"capabilities left: {status}")
    expect(fields["NoNewPrivs"].strip() == "1" and fields["Seccomp"].strip() == "2", f"no NoNewPrivileges/seccomp: {status}")
    version = s.wait_log(f"spot-supervisor {s.v1} (commit ")
    s.enqueue(*(f"m{n}" for n in range(20)), "probe")
    s.wait("the queue drained by the service", s.queue_empty)
    handled = s.wait_log("handled m19", timeout=30)
    probe = s.wait_log("probe: writable:", timeout=30)
    writable = probe[-1].split("probe: writable:", 1)[1].split()
    expect("/var/lib/spot-supervisor" in writable and "/tmp" in writable, f"state dir or /tmp not writable: {writable}")
    for closed in ("/", "/etc", "/opt", "/usr", "/var/log", "/run", "/run/lock", "/home", "/root", "/proc/sys"):
        expect(closed not in writable, f"the service can write {closed}: {writable}")
    s.wait("STATUS= with the counts", lambda: "21 done" in s.prop("StatusText"), timeout=15)
    # journald priorities: info stays info, and no second timestamp in the message.
    plain = [e["MESSAGE"] for e in s.entries() if e.get("PRIORITY") == str(INFO) and e.get("_PID") == p["MainPID"]]
    expect(any(m.startswith("supervisor[") for m in plain), "no supervisor line at priority info")
    expect(not any(m[:2].isdigit() and m[2:3] == ":" for m in plain), "log lines still carry their own timestamp")
    return [*ready, *started, *version, status.replace("\n", "  "), *handled, *probe, f"StatusText={s.prop('StatusText')}"]


def drop_in_environment_does_not_beat_the_env_file(s: Service) -> list[str]:
    """docs/deploy.md: Environment= in a drop-in loses to EnvironmentFile=; a second EnvironmentFile= wins."""
    s.write(DROP_IN, "[Service]\nEnvironment=SPOT_SCALING_WORKERS=3\n")
    s.mark()
    s.sh(f"systemctl daemon-reload && systemctl restart {UNIT}")
    s.wait_active()
    lost = s.wait_log("ready: 2 worker(s) running")
    s.write(f"{ETC}/override.env", "SPOT_SCALING_WORKERS=3\n", "0640")
    s.write(DROP_IN, f"[Service]\nEnvironmentFile={ETC}/override.env\n")
    s.mark()
    s.sh(f"systemctl daemon-reload && systemctl restart {UNIT}")
    s.wait_active()
    won = s.wait_log("ready: 3 worker(s) running")
    return [f"Environment=SPOT_SCALING_WORKERS=3 in a drop-in: {lost[-1]}", f"EnvironmentFile= in a drop-in: {won[-1]}"]


def bad_value_exits_78_and_is_not_restarted(s: Service) -> list[str]:
    s.write(f"{ETC}/override.env", "SPOT_SCALING_WORKERS=lots\n", "0640")
    restarts = s.prop("NRestarts")
    s.mark()
    s.sh(f"systemctl restart --no-block {UNIT}")
    state = s.wait_stopped(states=("failed",))
    expect(state["ExecMainStatus"] == "78", f"expected failed with 78: {state}")
    s.not_restarted_after(restarts)
    errors = s.grep("config error", ERR)
    expect(any("config error: scaling.workers" in e for e in errors),
           f"no one-line error naming scaling.workers at priority err: {s.grep('config error')}")
    s.sh(f"rm -f {DROP_IN} {ETC}/override.env && systemctl daemon-reload && systemctl reset-failed {UNIT} && systemctl start {UNIT}")
    s.wait_active()
    return [*errors, *s.grep("status=78"), f"NRestarts={s.prop('NRestarts')}"]


def stop_drains_and_exits_0(s: Service) -> list[str]:
    s.mark()
    s.sh(f"systemctl stop {UNIT}")
    state = s.wait_stopped()
    expect(state["ExecMainStatus"] == "0" and state["Result"] == "success", f"{state}")
    lines = s.wait_log("drain")
    s.sh(f"systemctl start {UNIT}")
    return [*lines, *s.grep("supervisor exiting"), *s.grep("Deactivated successfully"), f"ExecMainStatus={state['ExecMainStatus']}"]


def stop_cuts_a_deaf_handler_at_the_drain_deadline(s: Service) -> list[str]:
    s.wait_active()
    s.mark()
    s.enqueue("hold:600")
    s.wait_log("holding hold:600")
    began = time.monotonic()
    s.sh(f"systemctl stop {UNIT}", check=False)
    state = s.wait_stopped()
    took = time.monotonic() - began
    expect(state["Result"] == "success" and state["ExecMainStatus"] == "0", f"not a clean stop: {state}")
    # Result=timeout would mean systemd's SIGKILL at TimeoutStopSec, not the supervisor's deadline, ended it.
    expect(s.prop("TimeoutStopUSec") == "1min", f"TimeoutStopSec is {s.prop('TimeoutStopUSec')}")
    warnings = s.journal(WARNING)
    expect(any("drain deadline reached" in line for line in warnings), f"no drain deadline warning: {warnings}")
    expect(not s.queue_empty(), "the held message was not released back to the queue")
    s.queue.clear_messages()
    s.sh(f"systemctl start {UNIT}")
    return [f"systemctl stop took {took:.1f}s (TimeoutStopSec=60s)", *warnings, *s.grep("supervisor exiting")]


def kill_9_of_the_supervisor_restarts_it(s: Service) -> list[str]:
    s.wait_active()
    before = s.show("MainPID", "NRestarts")
    workers = s.workers()
    s.mark()
    s.sh(f"kill -9 {before['MainPID']}")
    s.wait("a restart", lambda: s.prop("NRestarts") == str(int(before["NRestarts"]) + 1), timeout=30)
    s.wait_active()
    ready = s.wait_log("ready: 2 worker(s) running")
    orphans = s.sh(f"for p in {' '.join(map(str, workers))}; do [ -d /proc/$p ] && echo $p; done; true").split()
    expect(not orphans, f"workers of the killed supervisor outlived it: {orphans}")
    return [*s.grep("status=9/KILL"), *s.grep("Scheduled restart job"), *ready, f"NRestarts={s.prop('NRestarts')}"]


def a_worker_crash_does_not_restart_the_unit(s: Service) -> list[str]:
    before = s.show("MainPID", "NRestarts")
    victim = s.workers()[0]
    s.mark()
    s.sh(f"kill -9 {victim}")
    died = s.wait_log(f"worker {victim} died", WARNING)
    s.wait("the slot respawned", lambda: len(s.workers()) == 2, timeout=30)
    after = s.show("MainPID", "NRestarts", "ActiveState")
    expect(after["MainPID"] == before["MainPID"] and after["NRestarts"] == before["NRestarts"], f"{before} -> {after}")
    return [*died, *s.grep("spawned worker"), f"MainPID {after['MainPID']} unchanged, NRestarts={after['NRestarts']}"]


def eviction_drains_acks_and_holds(s: Service) -> list[str]:
    """Drain, acknowledge, then stay up without workers until the VM goes (issue 16): never restarted;
    the event disappearing while it still runs brings the workers back."""
    before = s.show("MainPID", "NRestarts")
    s.mark()
    event = s.imds.call("POST", "/simulate/eviction", {"delay_s": 30})
    held = s.wait_log(f"holding until {event['EventId']}")
    acks = s.imds.call("GET", "/simulate/acks")
    expect(any(event["EventId"] in json.dumps(a["body"]) for a in acks), f"the simulator got no ack for {event['EventId']}: {acks}")
    s.not_restarted_after(before["NRestarts"])
    after = s.show("MainPID", "ActiveState", "StatusText")
    expect(after["ActiveState"] == "active" and after["MainPID"] == before["MainPID"], f"not holding: {after}")
    expect(not s.workers() and "holding" in after["StatusText"], f"workers left or STATUS silent: {after}, {s.workers()}")
    lines = [*s.journal(WARNING), *s.grep("acknowledged"), *held, f"StatusText={after['StatusText']}"]
    s.imds.call("POST", "/simulate/reset", {})  # the event disappears before its NotBefore: not carried out
    lines += s.wait_log("resuming processing")
    s.wait("the workers back", lambda: len(s.workers()) == 2, timeout=30)
    return [*lines, f"MainPID {before['MainPID']} throughout, NRestarts={s.prop('NRestarts')}"]


def version_line(s: Service, version: str) -> list[str]:
    return s.wait_log(f"spot-supervisor {version} (")


def upgrade_drains_the_old_and_runs_the_new(s: Service) -> list[str]:
    s.wait_active()
    old = s.prop("MainPID")
    s.mark()
    out = s.orchestrate("pkg-v2", "-g")
    s.wait("a new supervisor", lambda: s.prop("MainPID") not in ("0", old) and s.prop("ActiveState") == "active")
    new = version_line(s, s.v2)
    links = s.sh(f"readlink {OPT}/current {OPT}/previous").split()
    expect(links == [s.v2, s.v1], f"current/previous are {links}")
    drained = [line for line in s.journal() if f"[{old}]" in line and ("drain" in line or "exiting" in line)]
    expect(bool(drained), f"no drain by the old supervisor {old}")
    return [*out.splitlines(), *drained, *new, f"current -> {links[0]}, previous -> {links[1]}"]


def rollback_switches_back(s: Service) -> list[str]:
    s.mark()
    out = s.orchestrate("pkg-v1", "-g")
    back = version_line(s, s.v1)
    s.wait_active()
    links = s.sh(f"readlink {OPT}/current {OPT}/previous").split()
    expect(links == [s.v1, s.v2], f"current/previous are {links}")
    return [*out.splitlines(), *back, f"current -> {links[0]}, previous -> {links[1]}"]


def second_install_changes_nothing(s: Service) -> list[str]:
    inventory = (f"find {OPT} {ETC} /etc/systemd/system/{UNIT} -printf '%p %l %m %u %g %s\\n' | sort; "
                 f"sha256sum {ETC}/* /etc/systemd/system/{UNIT}")
    before, pid = s.sh(inventory), s.prop("MainPID")
    s.mark()
    out = s.orchestrate("pkg-v1", "-i")
    time.sleep(1)
    expect(s.sh(inventory) == before, "a second -i changed files")
    expect(s.prop("MainPID") == pid and not s.grep("starting (python"), "a second -i restarted the service")
    return [*out.splitlines(), f"MainPID {pid} unchanged, {len(before.splitlines())} paths unchanged"]


def uninstall_keeps_etc_and_purge_removes_all(s: Service) -> list[str]:
    s.mark()
    out = s.orchestrate("pkg-v1", "-u")
    load = s.prop("LoadState")
    expect(load == "not-found", f"the unit is still {load}")
    left = s.sh(f"ls -d {ETC} {OPT} /var/lib/spot-supervisor 2>/dev/null; true").split()
    expect(ETC in left and OPT not in left, f"after -u: {left}")
    stopped = [*s.grep("supervisor exiting"), *s.grep("Deactivated successfully")]
    expect(bool(stopped), "no clean stop in the journal")
    purge = s.orchestrate("pkg-v1", "-u", "--purge")
    gone = s.sh(f"ls -d {ETC} {OPT} /var/lib/spot-supervisor 2>/dev/null; getent passwd spot-supervisor; true").split()
    expect(not gone, f"after -u --purge: {gone}")
    return [*out.splitlines(), *stopped, f"kept: {' '.join(left)}", *purge.splitlines()]


def reinstall_with_the_env_file_written_first(s: Service) -> list[str]:
    s.write(f"{ETC}/env", s.env, "0600")
    s.mark()
    s.orchestrate("pkg-v1", "-i")
    s.wait_active()
    perms = s.sh(f"stat -c '%n %a %U:%G' {ETC}/env").strip()
    expect(perms == f"{ETC}/env 640 root:spot-supervisor", perms)
    s.enqueue("after-reinstall")
    handled = s.wait_log("handled after-reinstall")
    return [*version_line(s, s.v1), *handled, perms]


def poweroff_drains_and_boot_starts_it(s: Service) -> list[str]:
    s.wait_active()
    pid = s.prop("MainPID")
    seconds = s.c.poweroff()
    s.c.boot()
    s.cursor = ""
    s.wait_active()
    expect(s.sh(f"systemctl is-enabled {UNIT}").strip() == "enabled", "not enabled")
    before = s.journal(boot="-1")
    # That supervisor's only stop was the poweroff's. (Its lines and systemd's come by different
    # channels, so journal order between them is not the order of events: no slicing at "Stopping".)
    last = [line for line in before if f"[{pid}]" in line and ("drain" in line or "exiting" in line)]
    last += [line for line in before[-3:] if "Deactivated" in line or "Stopped" in line]
    expect(any(f"[{pid}]" in line and "drain (SIGTERM)" in line for line in last), f"no drain before the poweroff: {last}")
    expect(any(f"[{pid}]" in line and "supervisor exiting (0)" in line for line in last), f"no clean exit before the poweroff: {last}")
    s.wait("the start-up line of this boot", lambda: any(f"spot-supervisor {s.v1} (" in line for line in s.journal(boot="0")))
    now = [line for line in s.journal(boot="0") if f"spot-supervisor {s.v1} (" in line or "Started spot" in line]
    return [f"poweroff took {seconds:.1f}s; the end of the previous boot:", *last, "this boot:", *now]


CHECKS: list[Callable[[Service], list[str]]] = [
    install_without_a_queue_fails_78_once,
    configured_it_is_ready_sandboxed_and_processes,
    drop_in_environment_does_not_beat_the_env_file,
    bad_value_exits_78_and_is_not_restarted,
    stop_drains_and_exits_0,
    stop_cuts_a_deaf_handler_at_the_drain_deadline,
    kill_9_of_the_supervisor_restarts_it,
    a_worker_crash_does_not_restart_the_unit,
    eviction_drains_acks_and_holds,
    upgrade_drains_the_old_and_runs_the_new,
    rollback_switches_back,
    second_install_changes_nothing,
    uninstall_keeps_etc_and_purge_removes_all,
    reinstall_with_the_env_file_written_first,
    poweroff_drains_and_boot_starts_it,
]
