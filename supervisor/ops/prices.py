"""Linux Spot and pay-as-you-go hourly prices of one VM size in one region (Azure Retail Prices API).

The API needs no authentication. Its `$filter` narrows the answer, but every row
is checked again here (the filter is a hint to the server, not a promise): only
Linux rows of type Consumption for this SKU and region, priced per hour in USD;
Windows, "Low Priority", DevTest and Reservation rows never count. Results come
in pages (`NextPageLink`, followed only on the endpoint's own scheme and host);
429 and 5xx answers are retried with backoff, honouring Retry-After. An answer is
bounded in size and in time, prices must be finite and not negative, and error
lines never quote what a server sent. An answer is cached for a day under the
state directory.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from supervisor.retry_after import honour_retry_after, parse_retry_after
from worker.common import jsonsafe
from worker.common.backoff import Backoff
from worker.common.text import one_line

log = logging.getLogger(__name__)

DEFAULT_PRICES_ENDPOINT = "https://prices.azure.com/api/retail/prices"
API_VERSION = "2023-01-01-preview"
CACHE_TTL_S = 24 * 3600.0
MAX_PAGES = 50  # the answer for one SKU in one region is a page or two; a loop of links is a server bug
MAX_ATTEMPTS = 5  # per page
MAX_RETRY_WAIT_S = 30.0  # a longer Retry-After is cut to this: a CLI user is waiting
REQUEST_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # one page of one size in one region is some 10 KB
DEADLINE_S = 120.0  # every page, retry and wait together: an answer that trickles in byte by byte ends here


class PricesError(Exception):
    """No price: the API could not be reached, answered something unusable, or lists no such price.
    str() is one line for the operator."""


@dataclass(frozen=True)
class PriceQuote:
    sku: str
    region: str
    spot_usd_per_hour: float
    on_demand_usd_per_hour: float

    @property
    def savings_pct(self) -> float:
        """How much less Spot costs than pay-as-you-go, in percent (2 decimals)."""
        if self.on_demand_usd_per_hour <= 0:
            return 0.0
        return round(100.0 * (self.on_demand_usd_per_hour - self.spot_usd_per_hour) / self.on_demand_usd_per_hour, 2)

    @property
    def difference_usd_per_hour(self) -> float:
        return self.on_demand_usd_per_hour - self.spot_usd_per_hour

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "savings_pct": self.savings_pct}

    def describe(self) -> str:
        return (f"{self.sku} in {self.region} (Linux): Spot ${self.spot_usd_per_hour:.4f}/h, "
                f"pay-as-you-go ${self.on_demand_usd_per_hour:.4f}/h, {self.savings_pct:g}% less")


def price_filter(sku: str, region: str) -> str:
    """The OData filter (values are case-sensitive with this api-version)."""
    return (f"serviceName eq 'Virtual Machines' and armSkuName eq '{_quoted(sku)}' "
            f"and armRegionName eq '{_quoted(region)}' and priceType eq 'Consumption'")


def _quoted(value: str) -> str:
    return value.replace("'", "''")  # OData string literal


# -- choosing the rows ----------------------------------------------------------------------------


def is_linux_consumption_row(item: dict[str, Any], sku: str, region: str) -> bool:
    """This SKU and region, pay-as-you-go per hour in USD, Linux, neither Low Priority nor DevTest nor Reservation."""
    text = " ".join(str(item.get(k, "")) for k in ("productName", "skuName", "meterName"))
    return (item.get("armSkuName") == sku and item.get("armRegionName") == region
            and item.get("type") == "Consumption"  # DevTestConsumption and Reservation rows are other types
            and item.get("currencyCode", "USD") == "USD"
            and item.get("unitOfMeasure") == "1 Hour"
            and "Windows" not in text and "Low Priority" not in text
            and is_price(item.get("retailPrice")))


def is_price(value: Any) -> bool:
    """A price in dollars: a finite, non-negative number (not a string, a boolean, NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def quote_from_items(items: Iterable[dict[str, Any]], sku: str, region: str) -> PriceQuote:
    """The Spot and the pay-as-you-go price among the API's rows (the newest row of each, if several)."""
    spot: list[dict[str, Any]] = []
    on_demand: list[dict[str, Any]] = []
    seen = 0
    for item in items:
        seen += 1
        if not is_linux_consumption_row(item, sku, region):
            continue
        (spot if "Spot" in str(item.get("skuName", "")) else on_demand).append(item)
    if not spot or not on_demand:
        missing = " and ".join(what for what, rows in (("Spot", spot), ("pay-as-you-go", on_demand)) if not rows)
        raise PricesError(f"no Linux {missing} price for {sku} in {region} ({seen} row(s) listed; "
                          "check the size and region spelling, e.g. Standard_D4s_v5 and westeurope)")

    def newest(rows: list[dict[str, Any]]) -> float:
        return float(max(rows, key=lambda r: str(r.get("effectiveStartDate", "")))["retailPrice"])

    return PriceQuote(sku, region, newest(spot), newest(on_demand))


# -- the API --------------------------------------------------------------------------------------


def fetch_quote(endpoint: str, sku: str, region: str, *, timeout_s: float = REQUEST_TIMEOUT_S,
                backoff: Backoff | None = None, sleep: Callable[[float], None] = time.sleep,
                deadline_s: float = DEADLINE_S) -> PriceQuote:
    """Ask the Retail Prices API, following every NextPageLink on the endpoint's scheme and host.
    Raises PricesError."""
    backoff = backoff or Backoff(0.5, MAX_RETRY_WAIT_S)
    deadline = time.monotonic() + deadline_s
    items: list[dict[str, Any]] = []
    url: str | None = endpoint
    params: dict[str, str] | None = {"api-version": API_VERSION, "$filter": price_filter(sku, region)}
    with httpx.Client(trust_env=True, timeout=timeout_s, headers={"User-Agent": "spot-supervisor-prices"}) as client:
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_PAGES:
                raise PricesError(f"{endpoint}: more than {MAX_PAGES} pages for one size in one region")
            page = _get_page(client, url, params, backoff, sleep, deadline)
            page_items = page.get("Items")
            if not isinstance(page_items, list):
                raise PricesError(f"{endpoint}: the answer has no Items list")
            items.extend(item for item in page_items if isinstance(item, dict))
            link = page.get("NextPageLink")
            url, params = (_same_origin(endpoint, link), None) if isinstance(link, str) and link else (None, None)
    return quote_from_items(items, sku, region)


def _same_origin(endpoint: str, link: str) -> str:
    """`link` when it has the endpoint's scheme, host and port; else PricesError. A link elsewhere (an
    answer from a spoofed or hostile server) must not make this VM ask anyone else anything."""
    try:
        ours, theirs = httpx.URL(endpoint), httpx.URL(link)
        same = (theirs.scheme, theirs.host, theirs.port) == (ours.scheme, ours.host, ours.port)
    except (httpx.InvalidURL, ValueError, TypeError):
        same = False
    if not same:
        raise PricesError(f"{_where(endpoint)}: the answer's NextPageLink leaves {_origin(endpoint)}; not followed")
    return link


def _origin(url: str) -> str:
    try:
        parsed = httpx.URL(url)
        return f"{parsed.scheme}://{parsed.netloc.decode('ascii', 'replace')}"
    except (httpx.InvalidURL, ValueError, TypeError):
        return "the endpoint"


def _get_page(client: httpx.Client, url: str, params: dict[str, str] | None, backoff: Backoff,
              sleep: Callable[[float], None], deadline: float) -> dict[str, Any]:
    backoff.reset()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        retry_after: float | None = None
        try:
            status, headers, body = _read_answer(client, url, params, deadline)
        except httpx.HTTPError as exc:
            problem = f"{type(exc).__name__}: {one_line(exc) or 'no detail'}"
        else:
            if status == 200:
                try:
                    data = jsonsafe.loads(body, max_bytes=MAX_ANSWER_BYTES)
                except jsonsafe.JsonError as exc:
                    raise PricesError(f"{_where(url)}: the answer is not JSON ({exc})") from None
                if not isinstance(data, dict):
                    raise PricesError(f"{_where(url)}: the answer is not a JSON object")
                return data
            problem = f"HTTP {status}"
            if status != 429 and status < 500:  # the body is the server's text: never printed
                raise PricesError(f"{_where(url)}: {problem}")
            retry_after = parse_retry_after(headers.get("Retry-After"))
        if attempt == MAX_ATTEMPTS:
            raise PricesError(f"{_where(url)} unreachable after {MAX_ATTEMPTS} attempts: {problem}")
        delay = honour_retry_after(backoff.next_delay(), retry_after, MAX_RETRY_WAIT_S)
        if time.monotonic() + delay >= deadline:
            raise PricesError(f"{_where(url)}: no answer within {DEADLINE_S:g}s: {problem}")
        log.debug("prices: %s (attempt %d), retrying in %.1fs", problem, attempt, delay)
        sleep(delay)
    raise AssertionError("unreachable")


def _read_answer(client: httpx.Client, url: str, params: dict[str, str] | None,
                 deadline: float) -> tuple[int, httpx.Headers, bytes]:
    """(status, headers, body) of one GET, the body read only up to MAX_ANSWER_BYTES and only until the
    deadline; PricesError past either."""
    with client.stream("GET", url, params=params) as response:
        if response.status_code != 200:  # the body is never read, let alone shown
            return response.status_code, response.headers, b""
        body = bytearray()
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise PricesError(f"{_where(url)}: the answer is over {MAX_ANSWER_BYTES} bytes; not read further")
            if time.monotonic() > deadline:
                raise PricesError(f"{_where(url)}: no complete answer within {DEADLINE_S:g}s")
        return response.status_code, response.headers, bytes(body)


def _where(url: str) -> str:
    return url.split("?", 1)[0]


# -- the day's cache ------------------------------------------------------------------------------


def state_directory(environ: Mapping[str, str] | None = None) -> Path:
    """systemd's StateDirectory= ($STATE_DIRECTORY), else $XDG_STATE_HOME/spot-supervisor, else ~/.local/state/spot-supervisor."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "spot-supervisor"


def _cache_path(directory: Path, sku: str, region: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{sku}-{region}")
    return directory / f"prices-{safe}.json"


def read_cached(directory: Path, endpoint: str, sku: str, region: str, now: float | None = None) -> PriceQuote | None:
    """The cached quote if it is less than a day old and came from the same endpoint; else None."""
    try:
        data = jsonsafe.loads(_cache_path(directory, sku, region).read_bytes(), max_depth=4)
        age = (time.time() if now is None else now) - float(data["fetched_at"])
        if data["endpoint"] != endpoint or not 0 <= age < CACHE_TTL_S:
            return None
        q = data["quote"]
        spot, on_demand = q["spot_usd_per_hour"], q["on_demand_usd_per_hour"]
    except (OSError, ValueError, KeyError, TypeError):  # jsonsafe.JsonError is a ValueError
        return None
    if not (is_price(spot) and is_price(on_demand)):
        return None
    return PriceQuote(sku, region, float(spot), float(on_demand))


def write_cache(directory: Path, endpoint: str, quote: PriceQuote, now: float | None = None) -> None:
    """Best effort: a cache that cannot be written only means asking the API again next time."""
    path = _cache_path(directory, quote.sku, quote.region)
    record = {"fetched_at": time.time() if now is None else now, "endpoint": endpoint, "quote": quote.to_dict()}
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        partial.write_text(json.dumps(record))
        partial.replace(path)
    except OSError as exc:
        log.debug("prices: cannot write the cache %s: %s", path, exc)


def get_quote(endpoint: str, sku: str, region: str, directory: Path | None = None) -> tuple[PriceQuote, bool]:
    """(quote, from_cache): the day's cached answer, else the API's (then cached). Raises PricesError."""
    directory = state_directory() if directory is None else directory
    cached = read_cached(directory, endpoint, sku, region)
    if cached is not None:
        return cached, True
    quote = fetch_quote(endpoint, sku, region)
    write_cache(directory, endpoint, quote)
    return quote, False
