"""events.source = "auto": the cloud from DMI files (fake trees in tests/fixtures/dmi)."""

from __future__ import annotations

from pathlib import Path

import pytest

from supervisor.config import EventsSettings
from supervisor.vm.platform import choose_source, detect_cloud, read_dmi
from testsupport.clouds import DMI


@pytest.mark.parametrize(("tree", "source"), [("azure", "azure"), ("aws-nitro", "aws"), ("aws-xen", "aws"),
                                              ("gcp", "gcp"), ("unknown", "none")])
def test_each_platform_is_recognised(tree: str, source: str) -> None:
    assert detect_cloud(read_dmi(DMI / tree))[0] == source


def test_hyper_v_outside_azure_is_not_azure() -> None:
    assert detect_cloud({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"})[0] == "none"


def test_an_instance_id_in_board_asset_tag_alone_is_aws() -> None:
    assert detect_cloud({"sys_vendor": "", "board_asset_tag": "i-0abc1234def567890"})[0] == "aws"


def test_no_dmi_at_all_is_none_and_says_so(tmp_path: Path) -> None:
    choice = choose_source(EventsSettings(source="auto", dmi_dir=str(tmp_path / "absent")))
    assert (choice.source, choice.endpoint) == ("none", "")
    assert "nothing readable" in choice.why


def test_endpoint_defaults_per_source_and_the_setting_overrides() -> None:
    assert choose_source(EventsSettings(source="gcp")).endpoint == "http://metadata.google.internal"
    assert choose_source(EventsSettings(source="aws")).endpoint == "http://169.254.169.254"
    assert choose_source(EventsSettings(source="auto", dmi_dir=str(DMI / "gcp"),
                                        endpoint="http://127.0.0.1:9")).endpoint == "http://127.0.0.1:9"
