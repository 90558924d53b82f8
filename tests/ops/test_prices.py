"""`spot-supervisor prices` and the running service's cost figures, against a local stand-in of the
Azure Retail Prices API served from the recorded pages (shared fixtures), over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from supervisor.ops.cost import CostTracker
from supervisor.ops.prices import PriceQuote, PricesError, fetch_quote, quote_from_items, read_cached, write_cache
from supervisor.pool.metrics import SupervisorMetrics
from supervisor.simulator.server import ImdsSimulator
from testsupport.azurite import Azurite
from testsupport.harness import AZURE_FIXTURES, REPO, child_env
from testsupport.net import free_port
from testsupport.waiting import wait_until
from worker.common.backoff import Backoff

SKU, REGION = "Standard_D4s_v5", "westeurope"
SPOT, ON_DEMAND = 0.0414, 0.23  # the Linux rows of retail-prices-page1.json
PAGES = [json.loads((AZURE_FIXTURES / f"retail-prices-page{n}.json").read_text()) for n in (1, 2)]


class RetailPrices:
    """The API's shapes: page 1 at the endpoint, page 2 behind its NextPageLink (rewritten to point here).

    `failures` are answered first, one per request: (status, headers). Every request is recorded."""

    def __init__(self, failures: list[tuple[int, dict[str, str]]] | None = None, pages: list[dict[str, Any]] | None = None) -> None:
        self.failures = list(failures or [])
        self.pages = pages if pages is not None else PAGES
        self.requests: list[dict[str, list[str]]] = []
        self.statuses: list[int] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/retail/prices"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                query = parse_qs(urlsplit(self.path).query)
                api.requests.append(query)
                if api.failures:
                    status, headers = api.failures.pop(0)
                    self._send(status, {"Error": {"Code": "TooManyRequests"}}, headers)
                    return
                index = int(query.get("$skip", ["0"])[0]) // 3
                page = dict(api.pages[index])
                if page.get("NextPageLink"):
                    page["NextPageLink"] = f"{api.endpoint}?{urlsplit(page['NextPageLink']).query}"
                self._send(200, page, {})

            def _send(self, status: int, body: Any, headers: dict[str, str]) -> None:
                api.statuses.append(status)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def __enter__(self) -> RetailPrices:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def api() -> Iterator[RetailPrices]:
    with RetailPrices(failures=[(429, {"Retry-After": "1"}), (503, {})]) as server:
        yield server


def cli_env(tmp_path: Path, **spot: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPOT_") and k != "STATE_DIRECTORY"}
    env.update({"STATE_DIRECTORY": str(tmp_path / "state"), "SPOT_EVENTS_SOURCE": "none",
                "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])})
    env.update({f"SPOT_{k.upper()}": v for k, v in spot.items()})
    return env


def prices(tmp_path: Path, *args: str, **spot: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "supervisor", "prices", *args], env=cli_env(tmp_path, **spot),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


# -- the command ----------------------------------------------------------------------------------


def test_json_has_the_exact_linux_prices_after_a_429_a_503_and_two_pages(api: RetailPrices, tmp_path: Path) -> None:
    result = prices(tmp_path, "--sku", SKU, "--region", REGION, "--json", cost_prices_endpoint=api.endpoint)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert {k: answer[k] for k in ("sku", "region", "spot_usd_per_hour", "on_demand_usd_per_hour", "savings_pct")} == {
        "sku": SKU, "region": REGION, "spot_usd_per_hour": SPOT, "on_demand_usd_per_hour": ON_DEMAND, "savings_pct": 82.0}
    assert answer["cached"] is False
    assert api.statuses == [429, 503, 200, 200]  # retried, then both pages
    first = api.requests[0]
    assert first["api-version"] == ["2023-01-01-preview"]
    assert first["$filter"] == [f"serviceName eq 'Virtual Machines' and armSkuName eq '{SKU}' "
                                f"and armRegionName eq '{REGION}' and priceType eq 'Consumption'"]
    assert api.requests[-1]["$skip"] == ["3"]


def test_sku_and_region_come_from_instance_metadata(api: RetailPrices, tmp_path: Path) -> None:
    with ImdsSimulator(vm_size=SKU, location=REGION) as imds:
        result = prices(tmp_path, events_source="azure", events_endpoint=imds.url, cost_prices_endpoint=api.endpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{SKU} in {REGION} (Linux): Spot $0.0414/h, pay-as-you-go $0.2300/h, 82% less"]


def test_the_answer_is_cached_for_a_day(api: RetailPrices, tmp_path: Path) -> None:
    assert prices(tmp_path, "--sku", SKU, "--region", REGION, cost_prices_endpoint=api.endpoint).returncode == 0
    asked = len(api.requests)
    again = prices(tmp_path, "--sku", SKU, "--region", REGION, "--json", cost_prices_endpoint=api.endpoint)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["cached"] is True and json.loads(again.stdout)["spot_usd_per_hour"] == SPOT
    assert len(api.requests) == asked  # not asked again
    state = tmp_path / "state"
    assert read_cached(state, api.endpoint, SKU, REGION, now=time.time() + 23 * 3600) is not None
    assert read_cached(state, api.endpoint, SKU, REGION, now=time.time() + 25 * 3600) is None  # a day old: ask again
    assert read_cached(state, "http://elsewhere/", SKU, REGION) is None


def test_an_unreachable_api_is_one_line_and_exit_1(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api/retail/prices"
    result = prices(tmp_path, "--sku", SKU, "--region", REGION, cost_prices_endpoint=closed)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("prices: ") and "unreachable" in result.stderr and "Traceback" not in result.stderr


def test_no_price_for_the_size_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with RetailPrices() as api:  # answers the D4s_v5 pages whatever is asked: none of the rows is this size
        result = prices(tmp_path, "--sku", "Standard_NC96ads_A100_v4", "--region", REGION, cost_prices_endpoint=api.endpoint)
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "no Linux Spot and pay-as-you-go price for Standard_NC96ads_A100_v4" in result.stderr


def test_without_instance_metadata_it_asks_for_sku_and_region(tmp_path: Path) -> None:
    result = prices(tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "--sku" in result.stderr


# -- choosing rows: the excluded ones are in the fixtures, and the server's filter is not trusted ---


def test_windows_low_priority_devtest_and_reservation_rows_never_count() -> None:
    rows = [item for page in PAGES for item in page["Items"]]
    assert {r["type"] for r in rows} >= {"Consumption", "DevTestConsumption", "Reservation"}
    assert quote_from_items(rows, SKU, REGION) == PriceQuote(SKU, REGION, SPOT, ON_DEMAND)
    # Only the excluded rows: no price at all, rather than a wrong one.
    excluded = [r for r in rows if "Windows" in r["productName"] or "Low Priority" in r["skuName"] or r["type"] != "Consumption"]
    with pytest.raises(PricesError, match="no Linux Spot and pay-as-you-go price"):
        quote_from_items(excluded, SKU, REGION)
    # Another region's rows in the answer are ignored too.
    moved = [{**r, "armRegionName": "eastus"} for r in rows]
    with pytest.raises(PricesError):
        quote_from_items(moved, SKU, REGION)


def test_a_long_retry_after_is_honoured_within_the_cap() -> None:
    waits: list[float] = []
    with RetailPrices(failures=[(429, {"Retry-After": "7"})]) as api:
        quote = fetch_quote(api.endpoint, SKU, REGION, backoff=Backoff(0.01, 0.02), sleep=waits.append)
    assert quote.savings_pct == 82.0
    assert waits == [7.0]


def test_a_next_page_link_that_loops_is_an_error_not_a_hang() -> None:
    looping = [{"Items": [], "NextPageLink": "https://prices.azure.com/api/retail/prices?$skip=0"}]
    with RetailPrices(pages=looping) as api, pytest.raises(PricesError, match="more than 50 pages"):
        fetch_quote(api.endpoint, SKU, REGION)
    assert len(api.requests) == 50


# -- the service's figures ------------------------------------------------------------------------


def test_savings_and_cost_per_message_accumulate_over_uptime() -> None:
    now = [1000.0]
    cost = CostTracker("http://unused", clock=lambda: now[0])
    assert cost.saved_usd() is None and cost.summary(10) == "up 0m00s"
    cost.quote = PriceQuote(SKU, REGION, SPOT, ON_DEMAND)
    now[0] += 2 * 3600
    assert cost.saved_usd() == pytest.approx(2 * (ON_DEMAND - SPOT))  # 0.3772
    assert cost.usd_per_message(100) == pytest.approx(2 * SPOT / 100)
    assert cost.usd_per_message(0) is None
    assert cost.summary(100) == "up 2h00m, saved $0.38 against pay-as-you-go, $0.000828 per completed message"
    regular = CostTracker("http://unused", is_spot=False, clock=lambda: now[0])
    regular.quote = cost.quote
    now[0] += 3600
    assert regular.saved_usd() == 0.0 and regular.cost_usd() == pytest.approx(ON_DEMAND)


def test_prices_and_savings_are_exported_as_metrics() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    now = [0.0]
    cost = CostTracker("http://unused", clock=lambda: now[0])
    SupervisorMetrics(provider.get_meter("test")).observe_cost(cost, completed=lambda: 50)

    def collected() -> dict[str, float]:
        data = reader.get_metrics_data()
        points = {}
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    for point in metric.data.data_points:
                        points[metric.name] = point.value
        return points

    assert collected() == {}  # nothing until prices are known
    cost.quote = PriceQuote(SKU, REGION, SPOT, ON_DEMAND)
    now[0] = 3600.0
    points = collected()
    assert points["spot.price.spot"] == SPOT and points["spot.price.on_demand"] == ON_DEMAND
    assert points["spot.cost.saved"] == pytest.approx(ON_DEMAND - SPOT)
    assert points["spot.cost.per_message"] == pytest.approx(SPOT / 50)
    provider.shutdown()


def test_write_cache_never_raises(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    write_cache(blocker / "state", "http://x", PriceQuote(SKU, REGION, SPOT, ON_DEMAND))


class Service:
    def __init__(self, env: dict[str, str], workdir: Path) -> None:
        self.log_path = workdir / "supervisor.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "supervisor", "run"], env=env, cwd=workdir,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def cleanup(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._log.close()


@pytest.fixture
def service_env(azurite: Azurite, queue_name: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    with ImdsSimulator(vm_size=SKU, location=REGION) as imds:
        yield {**child_env(azurite, queue_name=queue_name, scaling_workers="1", events_source="azure",
                           events_endpoint=imds.url, cost_enabled="true"),
               "STATE_DIRECTORY": str(tmp_path / "state")}


def test_the_service_logs_prices_once_and_reports_savings_at_exit(api: RetailPrices, service_env: dict[str, str],
                                                                   tmp_path: Path) -> None:
    service = Service({**service_env, "SPOT_COST_PRICES_ENDPOINT": api.endpoint}, tmp_path)
    try:
        wait_until(lambda: "ready:" in service.log() and "prices:" in service.log(), 60, lambda: service.log()[-3000:])
        assert service.stop() == 0
    finally:
        service.cleanup()
    log = service.log()
    price_lines = [line for line in log.splitlines() if "prices:" in line]
    assert len(price_lines) == 1 and "Spot $0.0414/h, pay-as-you-go $0.2300/h, 82% less" in price_lines[0], log
    exit_line = next(line for line in log.splitlines() if "supervisor exiting" in line)
    assert "; up 0m" in exit_line and "saved $0.00 against pay-as-you-go" in exit_line, exit_line


def test_the_service_starts_without_prices_and_warns_once(service_env: dict[str, str], tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}/api/retail/prices"
    service = Service({**service_env, "SPOT_COST_PRICES_ENDPOINT": closed}, tmp_path)
    try:
        wait_until(lambda: "ready:" in service.log() and "prices unavailable" in service.log(), 60,
                   lambda: service.log()[-3000:])
        assert service.stop() == 0
    finally:
        service.cleanup()
    log = service.log()
    warnings = [line for line in log.splitlines() if "prices" in line and "WARNING" in line]
    assert len(warnings) == 1, log
    exit_line = next(line for line in log.splitlines() if "supervisor exiting" in line)
    assert "savings unknown (no prices)" in exit_line, exit_line
