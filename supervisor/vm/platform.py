"""Which cloud this machine runs on, from the platform's own DMI identification (no network).

`events.source = "auto"` is decided here at start: reading a few small files under
/sys/class/dmi/id is instant, where probing metadata addresses could hang a start
on a machine that has none.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import EventsSettings

log = logging.getLogger(__name__)

# Azure sets this chassis asset tag on every VM (Hyper-V elsewhere does not).
AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"
# EC2 puts the instance id in board_asset_tag on Nitro instances.
EC2_INSTANCE_ID = re.compile(r"^i-[0-9a-f]{8,17}$")
DMI_FILES = ("sys_vendor", "product_name", "chassis_asset_tag", "board_asset_tag", "bios_vendor", "bios_version")
MAX_DMI_BYTES = 256

DEFAULT_ENDPOINTS = {
    "azure": "http://169.254.169.254",
    "aws": "http://169.254.169.254",
    "gcp": "http://metadata.google.internal",
}


@dataclass(frozen=True)
class SourceChoice:
    source: str  # azure, aws, gcp or none
    why: str
    endpoint: str  # "" for none

    def describe(self) -> str:
        at = f" at {self.endpoint}" if self.endpoint else ""
        return f"{self.source}{at} ({self.why})"


def read_dmi(dmi_dir: str | Path) -> dict[str, str]:
    """The DMI fields that tell clouds apart; missing or unreadable ones are left out."""
    fields: dict[str, str] = {}
    for name in DMI_FILES:
        try:
            with open(Path(dmi_dir) / name, "rb") as f:
                raw = f.read(MAX_DMI_BYTES)
        except OSError:  # absent, or root-only (board_asset_tag is 0400 on some kernels)
            continue
        text = raw.decode("ascii", "replace").strip()
        if text:
            fields[name] = text
    return fields


def detect_cloud(dmi: dict[str, str]) -> tuple[str, str]:
    """(source, why) from DMI fields; ("none", why) when they name no cloud we know."""
    vendor = dmi.get("sys_vendor", "")
    product = dmi.get("product_name", "")
    if dmi.get("chassis_asset_tag") == AZURE_CHASSIS_ASSET_TAG:
        return "azure", f"DMI chassis_asset_tag is Azure's {AZURE_CHASSIS_ASSET_TAG}"
    if vendor == "Amazon EC2":
        return "aws", "DMI sys_vendor is 'Amazon EC2'"
    board = dmi.get("board_asset_tag", "")
    if EC2_INSTANCE_ID.match(board):
        return "aws", f"DMI board_asset_tag is an EC2 instance id ({board})"
    if "amazon" in dmi.get("bios_version", "").lower():  # older Xen-based instance types
        return "aws", f"DMI bios_version is {dmi['bios_version']!r}"
    if vendor == "Google" or product == "Google Compute Engine":
        return "gcp", f"DMI sys_vendor {vendor!r}, product_name {product!r}"
    seen = ", ".join(f"{k}={v!r}" for k, v in dmi.items() if k in ("sys_vendor", "product_name")) or "nothing readable"
    return "none", f"no cloud recognised from DMI ({seen})"


def choose_source(settings: EventsSettings) -> SourceChoice:
    """The notice source to use: the configured one, or for "auto" the one DMI names."""
    if settings.source == "auto":
        source, why = detect_cloud(read_dmi(settings.dmi_dir))
        why = f"auto: {why} in {settings.dmi_dir}"
    else:
        source, why = settings.source, "events.source"
    endpoint = (settings.endpoint or DEFAULT_ENDPOINTS[source]) if source != "none" else ""
    return SourceChoice(source, why, endpoint)
