"""The usage ledger's write side: added up in memory per request, written in batches.

A SQLite write per request would block the event loop; one `executemany` a second
does not. Rows are keyed by (day, tenant, key, tier); `flush` runs from a background
task and once more at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from serving.tenants.store import GatewayStore

Row = tuple[str, str, str, str]  # day, tenant, key, tier


_DAY: list = [None, ""]  # (whole second, its UTC day): the hot path asks many times a second


def utc_day(now: float) -> str:
    second = int(now)
    if _DAY[0] != second:
        _DAY[:] = [second, time.strftime("%Y-%m-%d", time.gmtime(second))]
    return _DAY[1]


def period_start(period: str, now: float) -> str:
    """The first day (YYYY-MM-DD, UTC) of the day or month that `now` is in."""
    day = utc_day(now)
    return day if period == "day" else day[:8] + "01"


class UsageLedger:
    def __init__(self, store: GatewayStore) -> None:
        self.store = store
        self.pending: dict[Row, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        self.spent_cache: dict[tuple[str, str], tuple[int, float]] = {}

    def add(self, tenant: str, key: str, tier: str, usage: dict | None, cost: float) -> None:
        usage = usage or {}
        row = self.pending[(utc_day(time.time()), tenant, key, tier)]
        row[0] += 1
        row[1] += usage.get("prompt_tokens") or 0
        row[2] += usage.get("completion_tokens") or 0
        row[3] += cost

    def spent(self, tenant: str, period: str, now: float | None = None) -> int:
        """Tokens the tenant used this day or month (UTC): written, plus not yet written.
        The written part is read at most once a second per tenant."""
        now = time.time() if now is None else now
        since = period_start(period, now)
        cached = self.spent_cache.get((tenant, since))
        if cached is None or now - cached[1] > 1.0:
            cached = self.spent_cache[(tenant, since)] = (self.store.spent(tenant, since), now)
        pending = sum(
            int(v[1] + v[2]) for k, v in self.pending.items() if k[1] == tenant and k[0] >= since
        )
        return cached[0] + pending

    def flush(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, defaultdict(lambda: [0, 0, 0, 0.0])
        self.spent_cache.clear()  # what was pending is now in the table
        self.store.record((*k, int(v[0]), int(v[1]), int(v[2]), v[3]) for k, v in batch.items())


async def flush_loop(ledger: UsageLedger, interval: float = 1.0) -> None:
    while True:
        await asyncio.sleep(interval)
        ledger.flush()
