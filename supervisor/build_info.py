"""What is running: the package version and, for an installed package, its BUILD_INFO.

orchestrate.sh copies the package's BUILD_INFO (written by packaging/build.sh:
version, python, platform, commit, tree) into the virtualenv it installs,
`sys.prefix/BUILD_INFO`, so the start-up line can say which commit runs and
whether it was built from a modified tree.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "spot-supervisor"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def read_build_info(path: Path) -> dict[str, str]:
    """key=value lines; {} when the file is absent (a development checkout) or unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return {}
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def describe_build(prefix: Path | None = None) -> str:
    """e.g. 'spot-supervisor 0.2.0 (commit 1a2b3c4, modified tree)'."""
    info = read_build_info((prefix or Path(sys.prefix)) / "BUILD_INFO")
    version = package_version()
    if not info:
        return f"{DISTRIBUTION} {version} (no BUILD_INFO: not installed by orchestrate.sh)"
    details = [f"commit {info.get('commit', 'unknown')}"]
    if info.get("tree") == "modified":
        details.append("modified tree")
    if info.get("version", version) != version:
        details.append(f"BUILD_INFO says {info['version']}")
    return f"{DISTRIBUTION} {version} ({', '.join(details)})"
