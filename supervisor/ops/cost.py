"""What this VM's Spot capacity saves: prices fetched in the background, savings accumulated over uptime.

Never in the way of the service: the fetch runs on its own daemon thread after
start, a failure is one warning, and without prices every figure is simply absent.
Uptime is this supervisor's (systemd starts it at boot), so one time base serves
the savings and the cost per completed message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from supervisor.ops.prices import PriceQuote, PricesError, get_quote

log = logging.getLogger(__name__)


class CostTracker:
    def __init__(self, endpoint: str, is_spot: bool = True, clock: Callable[[], float] = time.monotonic,
                 state_dir: Path | None = None) -> None:
        self.endpoint = endpoint
        self.is_spot = is_spot  # a regular VM pays pay-as-you-go: it saves nothing
        self.clock = clock
        self.state_dir = state_dir
        self.started_at = clock()
        self.quote: PriceQuote | None = None
        self.wanted = False  # prices were asked for (cost.enabled and a size and region to ask about)
        self._thread: threading.Thread | None = None

    # -- prices ---------------------------------------------------------------------------------

    def fetch_in_background(self, sku: str, region: str) -> threading.Thread:
        self.wanted = True
        self._thread = threading.Thread(target=self.fetch, args=(sku, region), name="prices", daemon=True)
        self._thread.start()
        return self._thread

    def fetch(self, sku: str, region: str) -> PriceQuote | None:
        try:
            quote, cached = get_quote(self.endpoint, sku, region, self.state_dir)
        except PricesError as exc:
            log.warning("prices unavailable, no savings figures this run: %s", exc)
            return None
        except Exception:  # a bug here must never take the service down
            log.exception("prices: unexpected failure")
            return None
        self.quote = quote
        log.info("prices: %s%s%s", quote.describe(), " (cached today)" if cached else "",
                 "" if self.is_spot else "; this VM is not Spot, so it saves nothing")
        return quote

    # -- figures --------------------------------------------------------------------------------

    def uptime_h(self) -> float:
        return max(0.0, self.clock() - self.started_at) / 3600.0

    def saved_usd(self) -> float | None:
        """Hours up × (pay-as-you-go − Spot); None until prices are known."""
        quote = self.quote
        if quote is None:
            return None
        return self.uptime_h() * quote.difference_usd_per_hour if self.is_spot else 0.0

    def cost_usd(self) -> float | None:
        quote = self.quote
        if quote is None:
            return None
        return self.uptime_h() * (quote.spot_usd_per_hour if self.is_spot else quote.on_demand_usd_per_hour)

    def usd_per_message(self, completed: int) -> float | None:
        cost = self.cost_usd()
        return cost / completed if cost is not None and completed > 0 else None

    def summary(self, completed: int) -> str:
        """For the exit line: uptime always; dollars when prices are known."""
        text = f"up {format_duration(self.uptime_h() * 3600)}"
        saved, per_message = self.saved_usd(), self.usd_per_message(completed)
        if saved is None:
            return text + (", savings unknown (no prices)" if self.wanted else "")
        text += f", saved ${saved:.2f} against pay-as-you-go"
        if per_message is not None:
            text += f", ${per_message:.6f} per completed message"
        return text


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
