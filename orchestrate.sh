#!/usr/bin/env bash
# orchestrate.sh: install, upgrade or uninstall spot-supervisor on a VM (systemd).
#
# Run it from an unpacked package (packaging/build.sh makes one; an Azure VM
# Application runs it as its install, update and remove command), as root:
#
#   orchestrate.sh -i            install this version, enable and start the service
#   orchestrate.sh -g            upgrade: install this version beside the running one,
#                                switch /opt/spot-supervisor/current, restart (the old
#                                supervisor drains), keep the previous version for rollback
#   orchestrate.sh -u [--purge]  stop (drain), disable, remove; config and state are kept
#                                unless --purge, which also removes the system user
#
#   --fleet-keeper  with -i / -g / -u: the fleet keeper's unit (spot-supervisor-fleet.service,
#                   `spot-supervisor fleet run`) instead of the per-VM service, for the one
#                   host that keeps the fleet; the package must be built with
#                   packaging/build.sh --with 'azure-mgmt-compute>=39,<40' (the `fleet` extra)
#
# Options:
#   --root DIR      stage everything under DIR and skip systemctl, useradd/userdel
#                   and chown (for tests and image builds); DIR is created if needed
#   --python PATH   interpreter for the virtualenv (default: /usr/bin/python3, else
#                   python3 on PATH); its X.Y must be the one the package was built for
#   --package DIR   the unpacked package (default: the directory of this script)
#
# Layout: /opt/spot-supervisor/<version>/ (a virtualenv installed from the package's
# wheelhouse with --no-index), /opt/spot-supervisor/current -> <version> (and
# previous -> the version before, kept by -g, which prunes any older one),
# /etc/spot-supervisor/config.toml and env (created once, never overwritten;
# made 0640 root:spot-supervisor),
# /etc/systemd/system/spot-supervisor.service (replaced by each install/upgrade).
# Every action is idempotent. Exit status: 0 done, 1 failed, 2 usage error.
set -euo pipefail
umask 022

readonly NAME=spot-supervisor
SERVICE="$NAME.service"

log() { printf 'orchestrate: %s\n' "$*" >&2; }
die() { printf 'orchestrate: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'orchestrate: %s (see --help)\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }

action=""
purge=false
root=""
root_mode=false
python=""
package=""
fleet_keeper=false

set_action() {
  [[ -z "$action" || "$action" == "$1" ]] || usage_error "choose one of -i, -u, -g"
  action=$1
}

while (($#)); do
  case "$1" in
    -i | --install) set_action install ;;
    -u | --uninstall) set_action uninstall ;;
    -g | --upgrade) set_action upgrade ;;
    --purge) purge=true ;;
    --fleet-keeper) fleet_keeper=true ;;
    --root) (($# >= 2)) || usage_error "--root needs a directory"; root=$2; root_mode=true; shift ;;
    --root=*) root=${1#--root=}; root_mode=true ;;
    --python) (($# >= 2)) || usage_error "--python needs a path"; python=$2; shift ;;
    --python=*) python=${1#--python=} ;;
    --package) (($# >= 2)) || usage_error "--package needs a directory"; package=$2; shift ;;
    --package=*) package=${1#--package=} ;;
    -h | --help) usage; exit 0 ;;
    *) usage_error "unknown argument: $1" ;;
  esac
  shift
done
[[ -n "$action" ]] || usage_error "choose one of -i (install), -u (uninstall), -g (upgrade)"
if [[ "$purge" == true && "$action" != uninstall ]]; then usage_error "--purge goes with -u"; fi
if [[ "$fleet_keeper" == true ]]; then SERVICE="$NAME-fleet.service"; fi
readonly SERVICE

if [[ "$root_mode" == true ]]; then
  [[ -n "$root" ]] || usage_error "--root needs a directory"
  mkdir -p -- "$root"
  root=$(cd -- "$root" && pwd -P)
  [[ "$root" != / ]] || usage_error "--root / is the machine itself: leave --root out"
  log "staging under $root: no systemctl, no useradd/userdel, no chown"
elif ((EUID != 0)); then
  die "run as root (or stage with --root DIR)"
fi

readonly opt="$root/opt/$NAME"
readonly etc="$root/etc/$NAME"
readonly unit_dir="$root/etc/systemd/system"
readonly unit_path="$unit_dir/$SERVICE"
readonly state_dir="$root/var/lib/$NAME"

# systemctl only on the real machine, and only when systemd is running
# (a container or an image build has the unit installed, not started).
systemd_running() {
  [[ "$root_mode" == false && -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1
}

lock() {
  command -v flock >/dev/null 2>&1 || return 0
  local dir="$root/run/lock"
  [[ -d "$dir" ]] || dir="$root/var/lock"
  mkdir -p -- "$dir"
  exec 9>"$dir/$NAME.orchestrate.lock"
  flock -w 900 9 || die "another orchestrate.sh still runs after 15 minutes"
}

# --- package -----------------------------------------------------------------

pkg=""
version=""
build_python=""

build_info() {
  local key=$1 line
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" == "$key="* ]]; then
      printf '%s\n' "${line#*=}"
      return 0
    fi
  done <"$pkg/BUILD_INFO"
  die "$pkg/BUILD_INFO has no $key="
}

load_package() {
  pkg=${package:-$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)}
  [[ -f "$pkg/BUILD_INFO" && -d "$pkg/wheelhouse" ]] ||
    die "$pkg is not a built package (no BUILD_INFO or wheelhouse/): build one with packaging/build.sh"
  version=$(build_info version)
  build_python=$(build_info python)
  case "$version" in
    "" | .* | *[!0-9A-Za-z.+_-]*) die "bad version in $pkg/BUILD_INFO: '$version'" ;;
  esac
  local f
  for f in "$pkg/$SERVICE" "$pkg/config/default.toml" "$pkg/requirements.txt"; do
    [[ -f "$f" ]] || die "package incomplete: $f is missing"
  done
}

find_python() {
  if [[ -z "$python" ]]; then
    if [[ -x /usr/bin/python3 ]]; then python=/usr/bin/python3; else python=$(command -v python3 || true); fi
  fi
  [[ -n "$python" && -x "$python" ]] || die "no python3 found: install it or pass --python PATH"
  local have
  have=$("$python" -c 'import sys, venv; print("%d.%d" % sys.version_info[:2])') ||
    die "$python cannot run 'import venv'"
  [[ "$have" == "$build_python" ]] ||
    die "package built for Python $build_python but $python is $have: rebuild with packaging/build.sh --target-python $have, or pass --python"
}

# --- steps -------------------------------------------------------------------

ensure_user() {
  if [[ "$root_mode" == true ]]; then return 0; fi
  if id -u "$NAME" >/dev/null 2>&1; then return 0; fi
  local shell=/usr/sbin/nologin
  [[ -x "$shell" ]] || shell=/bin/false
  useradd --system --user-group --home-dir "/var/lib/$NAME" --no-create-home \
    --shell "$shell" --comment "spot-supervisor service" "$NAME"
  log "created system user $NAME"
}

install_version() {
  local dest="$opt/$version" pip_wheel
  if [[ -f "$dest/.spot-installed" ]]; then
    log "version $version already installed in $dest"
    return 0
  fi
  pip_wheel=$(find "$pkg/wheelhouse" -maxdepth 1 -name 'pip-*.whl' -print -quit)
  [[ -n "$pip_wheel" ]] || die "no pip wheel in $pkg/wheelhouse"
  rm -rf -- "$dest" # the remains of an interrupted install
  mkdir -p -- "$opt"
  log "installing $NAME $version into $dest (offline, from the wheelhouse)"
  "$python" -m venv --without-pip "$dest"
  # pip runs from its wheel; no index, no pip.conf, no PIP_* variables: the wheelhouse only.
  PIP_CONFIG_FILE=/dev/null "$dest/bin/python" "$pip_wheel/pip" install --isolated --quiet \
    --no-index --find-links "$pkg/wheelhouse" --no-cache-dir --disable-pip-version-check \
    --requirement "$pkg/requirements.txt"
  "$dest/bin/python" -c 'import supervisor, worker' || die "the new virtualenv cannot import the package"
  [[ -x "$dest/bin/$NAME" ]] || die "$dest/bin/$NAME was not installed"
  # The supervisor names its version and commit in its start-up line from here.
  install -m 0644 -- "$pkg/BUILD_INFO" "$dest/BUILD_INFO"
  touch -- "$dest/.spot-installed"
}

check_fleet_extra() {
  [[ "$fleet_keeper" == true ]] || return 0
  "$opt/$version/bin/python" -c 'import azure.mgmt.compute' 2>/dev/null ||
    die "--fleet-keeper: this package has no azure-mgmt-compute; build it with packaging/build.sh --with 'azure-mgmt-compute>=39,<40'"
}

# Atomically point $opt/<link> at a version directory.
set_link() {
  local link=$1 target=$2 tmp="$opt/.$1.$$"
  ln -sfn -- "$target" "$tmp"
  mv -Tf -- "$tmp" "$opt/$link"
}

link_target() {
  if [[ -L "$opt/$1" ]]; then readlink -- "$opt/$1"; fi
}

install_config() {
  mkdir -p -- "$etc"
  if [[ ! -e "$etc/config.toml" ]]; then
    install -m 0640 -- "$pkg/config/default.toml" "$etc/config.toml"
    log "wrote $etc/config.toml (edit it; upgrades keep it)"
  fi
  if [[ ! -e "$etc/env" ]]; then
    cat >"$etc/env" <<'EOF'
# Environment for spot-supervisor.service (systemd EnvironmentFile=).
# Every config key can be set here as SPOT_<SECTION>_<KEY>=value, e.g.
#   SPOT_QUEUE_ACCOUNT_URL=https://<account>.queue.core.windows.net
#   SPOT_QUEUE_NAME=work
#   SPOT_STARTUP_WAIT_FOR_PROVISIONING=true
#   APPLICATIONINSIGHTS_CONNECTION_STRING=InstrumentationKey=...
EOF
  fi
  # Contents are never touched, but the service must read them and nobody
  # else may (they can hold a connection string), also when cloud-init or an
  # operator wrote them before the install.
  chmod 0750 -- "$etc"
  chmod 0640 -- "$etc/config.toml" "$etc/env"
  if [[ "$root_mode" == false ]]; then chown "root:$NAME" -- "$etc" "$etc/config.toml" "$etc/env"; fi
}

install_unit() {
  mkdir -p -- "$unit_dir"
  install -m 0644 -- "$pkg/$SERVICE" "$unit_path"
}

prune_versions() {
  local keep_a=$1 keep_b=$2 dir name
  for dir in "$opt"/*; do
    name=${dir##*/}
    [[ -d "$dir" && ! -L "$dir" ]] || continue
    [[ "$name" == "$keep_a" || "$name" == "$keep_b" ]] && continue
    log "removing old version $name"
    rm -rf -- "$dir"
  done
}

do_install() {
  local upgrading=$1 previous
  load_package
  find_python
  lock
  ensure_user
  install_version
  check_fleet_extra
  previous=$(link_target current)
  if [[ -n "$previous" && "$previous" != "$version" ]]; then
    set_link previous "$previous"
  fi
  set_link current "$version"
  install_config
  install_unit
  if [[ "$upgrading" == true ]]; then
    # Keep the version switched away from ($opt/previous): its supervisor may
    # still be draining, and it is the rollback (-g with its package again).
    prune_versions "$version" "$(link_target previous)"
  fi
  if systemd_running; then
    systemctl daemon-reload
    systemctl enable --quiet "$SERVICE"
    # --no-block: with [startup] wait_for_provisioning the new supervisor waits
    # for provisioningState Succeeded, which Azure reports only after this very
    # command (the VM Application install) has returned.
    if [[ -n "$previous" && "$previous" != "$version" ]]; then
      log "switching $previous -> $version: restarting $SERVICE (the old supervisor drains)"
      systemctl restart --no-block "$SERVICE"
    else
      systemctl start --no-block "$SERVICE"
    fi
  elif [[ "$root_mode" == false ]]; then
    log "systemd is not running here: $unit_path installed, not enabled or started"
  fi
  if [[ -n "$previous" && "$previous" != "$version" ]]; then
    log "$NAME $version installed and current (was $previous)"
  else
    log "$NAME $version installed and current"
  fi
}

do_uninstall() {
  lock
  if systemd_running; then
    if systemctl cat "$SERVICE" >/dev/null 2>&1; then
      log "stopping $SERVICE (the supervisor drains; up to TimeoutStopSec)"
      systemctl disable --now --quiet "$SERVICE" || log "stopping $SERVICE failed; removing it anyway"
    fi
  fi
  rm -f -- "$unit_path"
  if systemd_running; then
    systemctl daemon-reload
    systemctl reset-failed "$SERVICE" >/dev/null 2>&1 || true
  fi
  rm -rf -- "$opt"
  if [[ "$purge" == true ]]; then
    rm -rf -- "$etc" "$state_dir" "$unit_dir/$SERVICE.d"
    if [[ "$root_mode" == false ]] && id -u "$NAME" >/dev/null 2>&1; then
      userdel "$NAME" || log "could not remove user $NAME"
    fi
    log "$NAME removed with its configuration, state and user"
  else
    log "$NAME removed; kept $etc (remove it with -u --purge)"
  fi
}

case "$action" in
  install) do_install false ;;
  upgrade) do_install true ;;
  uninstall) do_uninstall ;;
esac
