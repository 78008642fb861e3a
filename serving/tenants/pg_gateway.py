"""The gateway's side of tenancy in PostgreSQL: no query on the request path.

Each gateway process holds every live key in memory (id -> digest and principal) and
answers `lookup` from it in microseconds. A background task keeps it current:

- it LISTENs on `tiergate_tenancy`, and reloads the snapshot as soon as a change is
  committed (`tiergate keys revoke` acts within a second on every replica and worker);
- every `check_s` it compares `tiergate_state.version` with its own, which catches a
  notice lost with a connection;
- once a second it writes the usage the ledger handed it, in one transaction, and reads
  back the spend of tenants with a budget;
- once an hour it deletes usage rows older than `retention_days`.

With the database unreachable: keys in the snapshot keep working for `max_stale_s`
after the last contact, then get 503; a key the snapshot does not hold gets 503 rather
than 401 (it may be new); usage waits in memory, at most `max_buffered` rows (sums per
tenant, day, key and tier, so a few per tenant a day), and goes out on recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

from serving.errors import GatewayError
from serving.tasks import cancel_and_wait
from serving.tenants import keys as keymod
from serving.tenants.pg_store import CHANNEL, SNAPSHOT, UPSERT_USAGE, migrate, usage_rows
from serving.tenants.store import Principal, principal_of
from serving.tenants.usage import period_start

log = logging.getLogger("tiergate.tenancy")


class KeyStoreUnavailable(GatewayError):
    status, type, code = 503, "service_unavailable_error", "key_store_unavailable"


class PgTenancy:
    def __init__(
        self,
        url: str,
        max_stale_s: float = 300.0,
        retention_days: int = 400,
        check_s: float = 5.0,
        max_buffered: int = 100_000,
        clock=time.monotonic,
        report: Callable[[dict[str, float]], None] | None = None,
    ) -> None:
        self.url = url
        self.max_stale_s = max_stale_s
        self.retention_days = retention_days
        self.check_s = check_s
        self.max_buffered = max_buffered
        self.clock = clock
        self.keys: dict[str, tuple[bytes, Principal]] = {}
        self.version: int | None = None  # of the snapshot held; None: never loaded
        self.connected = False
        self.last_contact = 0.0  # clock() of the last answer from the database
        self.outbox: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0, 0.0])
        self.spent_totals: dict[tuple[str, str], int] = {}
        self.budget_tenants: set[str] = set()
        self.reloads = 0
        self.dropped_rows = 0
        self.report = report  # given health() once a second (the metrics)

    # -- the request path: memory only --

    def lookup(self, key: str) -> Principal | None:
        kid = keymod.key_id(key)
        if kid is None:
            return None  # not a tiergate key at all: 401 whatever the database says
        if not self.connected and (
            self.version is None or self.clock() - self.last_contact > self.max_stale_s
        ):
            raise KeyStoreUnavailable(
                "The key store is unreachable and this gateway cannot check keys; retry."
            )
        entry = self.keys.get(kid)
        if entry is None or not keymod.matches(key, entry[0]):
            if not self.connected:  # possibly a key made since the last snapshot
                raise KeyStoreUnavailable(
                    "The key store is unreachable and this key is not known here yet; retry."
                )
            return None
        return entry[1]

    def record(self, rows: Iterable[tuple]) -> None:
        """The ledger's batch: (day, tenant, key, tier, requests, prompt, completion,
        cost), added to what waits for the next write."""
        for day, tenant, key, tier, *values in rows:
            row = self.outbox.get((day, tenant, key, tier))
            if row is None and len(self.outbox) >= self.max_buffered:
                self.dropped_rows += 1
                continue
            row = self.outbox[(day, tenant, key, tier)]
            for i, v in enumerate(values):
                row[i] += v

    def spent(self, tenant: str, since: str) -> int:
        """Tokens written for the tenant from day `since` on, as last read (once a
        second); the ledger adds what it has not handed over yet."""
        self.budget_tenants.add(tenant)
        return self.spent_totals.get((tenant, since), 0)

    def close(self) -> None:
        pass

    def health(self) -> dict[str, float]:
        """What an operator watches: contact, staleness, keys held, usage waiting."""
        age = self.clock() - self.last_contact if self.version is not None else -1.0
        return {
            "connected": float(self.connected),
            "contact_age_s": age,  # -1: never loaded
            "keys": float(len(self.keys)),
            "buffered_rows": float(len(self.outbox)),
            "dropped_rows": float(self.dropped_rows),
        }

    async def _report_every(self, interval: float) -> None:
        assert self.report is not None
        while True:
            self.report(self.health())
            await asyncio.sleep(interval)

    # -- the background task --

    async def run(self) -> None:
        reporter = asyncio.create_task(self._report_every(1.0)) if self.report else None
        try:
            await self._connect_forever()
        finally:
            await cancel_and_wait([reporter] if reporter is not None else [])

    async def _connect_forever(self) -> None:
        import psycopg

        backoff = 0.5
        while True:
            try:
                await asyncio.to_thread(self._migrate)
                async with (
                    await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=5
                    ) as listen,
                    await psycopg.AsyncConnection.connect(
                        self.url, autocommit=True, connect_timeout=5
                    ) as work,
                ):
                    await listen.execute(f"LISTEN {CHANNEL}")
                    await self._reload(work)
                    if not self.connected:
                        log.info("tenancy: key store connected, %d live keys", len(self.keys))
                    self.connected, backoff = True, 0.5
                    await self._serve(listen, work)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any database or network failure: the same path
                if self.connected:
                    log.warning("tenancy: lost the key store (%s); serving cached keys", exc)
                self.connected = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _migrate(self) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            migrate(conn)

    async def _serve(self, listen, work) -> None:
        next_check = self.clock() + self.check_s
        next_prune = self.clock()
        while True:
            changed = False
            async for _ in listen.notifies(timeout=1.0, stop_after=1):
                changed = True
            if changed or self.clock() >= next_check:
                version = await self._query(work, "SELECT version FROM tiergate_state")
                if version[0][0] != self.version:
                    await self._reload(work)
                next_check = self.clock() + self.check_s
            await self.flush(work)
            if self.clock() >= next_prune:  # every replica may: an indexed, idempotent delete
                async with asyncio.timeout(30):
                    await work.execute(
                        "DELETE FROM tiergate_usage WHERE day < current_date - %s::integer",
                        (self.retention_days,),
                    )
                next_prune = self.clock() + 3600

    async def _query(self, conn, sql: str, args: tuple = ()) -> list[tuple]:
        async with asyncio.timeout(5):  # a partition gives no error; a deadline does
            cur = await conn.execute(sql, args)
            rows = await cur.fetchall()
        self.last_contact = self.clock()
        return rows

    async def _reload(self, conn) -> None:
        # the version first: a change between the two reads is seen again next time
        version = (await self._query(conn, "SELECT version FROM tiergate_state"))[0][0]
        rows = await self._query(conn, SNAPSHOT)
        self.keys = {r[0]: (bytes(r[1]), principal_of(r[2:])) for r in rows}
        self.version = version
        self.reloads += 1

    async def flush(self, conn) -> None:
        """Write what the ledger handed over, in one transaction; on failure it stays
        for the next try. Then read the budgeted tenants' spend."""
        if self.outbox:
            batch, self.outbox = self.outbox, defaultdict(lambda: [0, 0, 0, 0.0])
            rows = usage_rows((*k, int(v[0]), int(v[1]), int(v[2]), v[3]) for k, v in batch.items())
            try:
                async with asyncio.timeout(10), conn.transaction(), conn.cursor() as cur:
                    await cur.executemany(UPSERT_USAGE, rows)
                self.last_contact = self.clock()
            except BaseException:
                self.record((*k, *v) for k, v in batch.items())  # back, for the next try
                raise
        if self.budget_tenants:
            now = time.time()
            for since in {period_start("day", now), period_start("month", now)}:
                found = await self._query(
                    conn,
                    "SELECT tenant, SUM(prompt_tokens + completion_tokens) FROM tiergate_usage "
                    "WHERE tenant = ANY(%s) AND day >= %s GROUP BY tenant",
                    (list(self.budget_tenants), since),
                )
                for tenant in self.budget_tenants:
                    self.spent_totals[(tenant, since)] = 0
                for tenant, total in found:
                    self.spent_totals[(tenant, since)] = int(total)

    async def aclose(self) -> None:
        """At shutdown, after the ledger's last flush: write what waits, briefly."""
        if not self.outbox:
            return
        import psycopg

        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, connect_timeout=3
                ) as conn:
                    await self.flush(conn)
        if self.outbox:
            log.warning("tenancy: %d usage rows could not be written at exit", len(self.outbox))
