#!/usr/bin/env bash
# Build the VM Application package dist/spot-supervisor-<version>.tar.gz.
#
#   packaging/build.sh [--out DIR] [--python PY] [--with SPEC]...
#                      [--target-python X.Y [--platform TAG]...]
#
# The version is pyproject.toml's. The archive is flat (what an Azure VM
# Application unpacks in its download directory) and holds:
#   BUILD_INFO               name, version, python X.Y, platform, commit, tree
#                            (clean, or modified: built with uncommitted changes)
#   orchestrate.sh           install / upgrade / uninstall (-i / -g / -u)
#   spot-supervisor.service  the systemd unit
#   spot-supervisor-fleet.service  the fleet keeper's unit (orchestrate.sh --fleet-keeper)
#   config/default.toml      the default /etc/spot-supervisor/config.toml
#   wheelhouse/*.whl         the project and every runtime dependency, plus pip,
#                            so that the VM installs with --no-index (offline)
#   requirements.txt         what orchestrate.sh installs from the wheelhouse
#
# --with SPEC (repeatable) adds your handler's code to the same virtualenv: a
# path to a project directory or a wheel (built here, pinned by its version),
# or a requirement such as 'mylib==1.2' (resolved from the index). Point
# [workload] handler at it.
#
# Wheels come from pip's configured index (pip wheel). When PY (default: the
# repo's .venv, else python3) has spot-supervisor installed, the dependencies
# are pinned to the versions installed there: the ones the tests ran with.
# Binary wheels (cffi, cryptography...) are for PY's Python and this machine's
# platform; for a VM image with another Python, pass --target-python X.Y (and
# --platform, default manylinux_2_28_x86_64): binary wheels only, no pins.
# Prints the path of the archive on stdout.
set -euo pipefail
umask 022

repo=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
out="$repo/dist"
python=${PYTHON:-}
target_python=""
platforms=()
withs=()

log() { printf 'build: %s\n' "$*" >&2; }
die() { printf 'build: error: %s\n' "$*" >&2; exit 1; }

while (($#)); do
  case "$1" in
    --out) (($# >= 2)) || die "--out needs a directory"; out=$2; shift ;;
    --python) (($# >= 2)) || die "--python needs a path"; python=$2; shift ;;
    --target-python) (($# >= 2)) || die "--target-python needs X.Y"; target_python=$2; shift ;;
    --platform) (($# >= 2)) || die "--platform needs a tag"; platforms+=("$2"); shift ;;
    --with) (($# >= 2)) || die "--with needs a path or a requirement"; withs+=("$2"); shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument: $1" ;;
  esac
  shift
done
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi
if ((${#platforms[@]})) && [[ -z "$target_python" ]]; then die "--platform goes with --target-python"; fi

for f in pyproject.toml orchestrate.sh packaging/spot-supervisor.service packaging/spot-supervisor-fleet.service config/default.toml; do
  [[ -f "$repo/$f" ]] || die "$repo/$f is missing"
done

version=$("$python" - "$repo/pyproject.toml" <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
try:
    import tomllib
    print(tomllib.loads(text)["project"]["version"])
except ImportError:  # Python 3.10 without tomli
    print(re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1))
EOF
)
case "$version" in
  "" | .* | *[!0-9A-Za-z.+_-]*) die "unusable version in pyproject.toml: '$version'" ;;
esac
name=spot-supervisor
build_python=${target_python:-$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')}
if [[ -n "$target_python" ]]; then
  ((${#platforms[@]})) || platforms=(manylinux_2_28_x86_64)
  platform=${platforms[*]}
else
  platform=$("$python" -c 'import sysconfig; print(sysconfig.get_platform())')
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/spot-build.XXXXXX")
trap 'rm -rf -- "$work"' EXIT
src="$work/src" pkg="$work/pkg"
mkdir -p -- "$src" "$pkg/wheelhouse" "$pkg/config" "$work/project" "$work/with"

# Build from a clean copy of the sources: no node_modules, no build/ or
# egg-info left in the work tree, safe while others edit it.
cp -R -- "$repo/pyproject.toml" "$repo/supervisor" "$repo/worker" "$repo/config" "$src/"
for f in README.md LICENSE LICENSE.txt MANIFEST.in; do
  if [[ -f "$repo/$f" ]]; then cp -- "$repo/$f" "$src/"; fi
done
if [[ ! -f "$src/README.md" ]]; then
  log "warning: README.md is missing; the wheel gets a placeholder"
  printf '# %s\n' "$name" >"$src/README.md"
fi
find "$src" -name __pycache__ -prune -exec rm -rf -- {} +

log "building $name $version wheel"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/project" "$src"
project_wheel=$(find "$work/project" -maxdepth 1 -name "spot_supervisor-$version-*.whl" -print -quit)
[[ -n "$project_wheel" ]] || die "pip wheel made no spot_supervisor-$version wheel"

# What orchestrate.sh installs, and what pip resolves the wheelhouse from.
requirements=("$name==$version")
inputs=("$project_wheel")
for spec in ${withs[@]+"${withs[@]}"}; do
  if [[ -e "$spec" ]]; then
    spec_path="$(cd -- "$(dirname -- "$spec")" && pwd -P)/$(basename -- "$spec")"
    log "building $spec"
    before=$(find "$work/with" -name '*.whl' | wc -l)
    "$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/with" "$spec_path"
    (($(find "$work/with" -name '*.whl' | wc -l) > before)) || die "pip wheel made no wheel from $spec"
  else
    requirements+=("$spec")
    inputs+=("$spec")
  fi
done
while IFS= read -r wheel; do
  base=${wheel##*/}
  IFS=- read -r dist dist_version _ <<<"$base"
  requirements+=("$dist==$dist_version")
  inputs+=("$wheel")
done < <(find "$work/with" -maxdepth 1 -name '*.whl' | sort)

if [[ -n "$target_python" ]]; then
  log "collecting binary wheels for Python $target_python on $platform"
  # pip takes platform tags literally: manylinux_2_28_x86_64 must also accept
  # the older manylinux_2_Y (and their legacy aliases) a 2.28 glibc runs.
  platform_args=()
  for p in "${platforms[@]}"; do
    platform_args+=(--platform "$p")
    if [[ "$p" =~ ^manylinux_2_([0-9]+)_(.+)$ ]]; then
      glibc_minor=${BASH_REMATCH[1]} arch=${BASH_REMATCH[2]}
      for ((y = glibc_minor - 1; y >= 5; y--)); do platform_args+=(--platform "manylinux_2_${y}_$arch"); done
      ((glibc_minor < 17)) || platform_args+=(--platform "manylinux2014_$arch")
      ((glibc_minor < 12)) || platform_args+=(--platform "manylinux2010_$arch")
      platform_args+=(--platform "manylinux1_$arch")
    fi
  done
  "$python" -m pip download --quiet --dest "$pkg/wheelhouse" --only-binary=:all: \
    --implementation cp --python-version "$target_python" "${platform_args[@]}" \
    "${inputs[@]}" pip
else
  constraints=()
  if "$python" -m pip show --quiet "$name" >/dev/null 2>&1; then
    "$python" -m pip list --format=freeze --exclude-editable >"$work/constraints.txt"
    constraints=(--constraint "$work/constraints.txt")
    log "pinning dependencies to the versions installed in $python's environment"
  fi
  log "collecting wheels for every runtime dependency"
  "$python" -m pip wheel --quiet --wheel-dir "$pkg/wheelhouse" ${constraints[@]+"${constraints[@]}"} "${inputs[@]}" pip
fi
find "$work/project" "$work/with" -maxdepth 1 -name '*.whl' -exec cp -f -- {} "$pkg/wheelhouse/" \;
printf '%s\n' "${requirements[@]}" >"$pkg/requirements.txt"
find "$pkg/wheelhouse" -maxdepth 1 -name 'pip-*.whl' | grep -q . || die "no pip wheel collected"

if [[ -z "$target_python" ]]; then
  # The VM installs offline: prove the wheelhouse alone resolves, as orchestrate.sh will.
  PIP_CONFIG_FILE=/dev/null "$python" -m pip install --isolated --quiet --dry-run --ignore-installed \
    --no-index --find-links "$pkg/wheelhouse" --requirement "$pkg/requirements.txt" ||
    die "the wheelhouse does not resolve requirements.txt (${requirements[*]}) offline"
fi

install -m 0755 -- "$repo/orchestrate.sh" "$pkg/orchestrate.sh"
install -m 0644 -- "$repo/packaging/spot-supervisor.service" "$pkg/spot-supervisor.service"
install -m 0644 -- "$repo/packaging/spot-supervisor-fleet.service" "$pkg/spot-supervisor-fleet.service"
install -m 0644 -- "$repo/config/default.toml" "$pkg/config/default.toml"
commit=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
# tree=modified: what goes into the package differs from the commit (changed or
# untracked files), so the commit alone does not say what runs.
if [[ "$commit" == unknown ]]; then
  tree=unknown
elif [[ -n "$(git -C "$repo" status --porcelain -- pyproject.toml supervisor worker config orchestrate.sh packaging 2>/dev/null)" ]]; then
  tree=modified
else
  tree=clean
fi
cat >"$pkg/BUILD_INFO" <<EOF
name=$name
version=$version
python=$build_python
platform=$platform
commit=$commit
tree=$tree
EOF

mkdir -p -- "$out"
archive="$(cd -- "$out" && pwd -P)/$name-$version.tar.gz"
tar --sort=name --owner=0 --group=0 --numeric-owner -C "$pkg" -cf - . | gzip -n >"$archive.tmp"
mv -f -- "$archive.tmp" "$archive"
log "wrote $archive ($(du -h "$archive" | cut -f1), $(find "$pkg/wheelhouse" -name '*.whl' | wc -l) wheels)"
printf '%s\n' "$archive"
