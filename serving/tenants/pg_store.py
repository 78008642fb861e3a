"""Tenants, keys and the usage ledger in PostgreSQL, shared by every router replica.

This module is the schema and the operator's side (`tiergate keys` with
`tenancy.database_url`): psycopg 3, one connection, synchronous. The gateway's side,
which never queries per request, is serving/tenants/pg_gateway.py.

- Migrations are numbered and run at start, inside one transaction that holds an
  advisory lock, so that N replicas starting together apply each exactly once.
- Every change to tenants or keys bumps `tiergate_state.version` and sends NOTIFY on
  the channel `tiergate_tenancy` in the same transaction: each gateway process reloads
  its snapshot on the notice, and a periodic version check catches up after a lost
  connection.
- Usage rows are (tenant, day, key, tier) sums, written by each process once a second
  in one transaction (never a row UPDATE per request); the primary key serves usage by
  tenant, day and key, and an index on day serves retention and reports over all
  tenants.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from serving.tenants import keys as keymod
from serving.tenants.store import (
    KEY_FIELDS,
    PRINCIPAL_COLUMNS,
    USAGE_FIELDS,
    Tenant,
    as_dicts,
    tenant_of,
)

CHANNEL = "tiergate_tenancy"
LOCK_ID = 0x7469_6572_6761_7465 & 0x7FFF_FFFF_FFFF_FFFF  # "tiergate": the migrations' lock

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
CREATE TABLE tiergate_tenants (
    name text PRIMARY KEY,
    tiers jsonb NOT NULL,                -- [] means every tier
    rpm bigint, tpm bigint, max_concurrency bigint,
    budget_tokens bigint, budget_period text NOT NULL DEFAULT 'month',
    budget_hard boolean NOT NULL DEFAULT true,
    created double precision NOT NULL
);
CREATE TABLE tiergate_keys (
    id text PRIMARY KEY,
    name text NOT NULL,
    tenant text NOT NULL REFERENCES tiergate_tenants(name),
    digest bytea NOT NULL,
    rpm bigint, tpm bigint, max_concurrency bigint,
    created double precision NOT NULL,
    revoked double precision,
    UNIQUE (tenant, name)
);
CREATE TABLE tiergate_usage (
    tenant text NOT NULL, day date NOT NULL, key text NOT NULL, tier text NOT NULL,
    requests bigint NOT NULL, prompt_tokens bigint NOT NULL,
    completion_tokens bigint NOT NULL, cost_usd double precision NOT NULL,
    PRIMARY KEY (tenant, day, key, tier)
);
CREATE INDEX tiergate_usage_day ON tiergate_usage (day);
CREATE TABLE tiergate_state (id integer PRIMARY KEY CHECK (id = 1), version bigint NOT NULL);
INSERT INTO tiergate_state VALUES (1, 0);
""",
    ),
]

# The live keys with their tenants: what a gateway holds in memory.
SNAPSHOT = (
    f"SELECT k.id, k.digest, {PRINCIPAL_COLUMNS} FROM tiergate_keys k "
    "JOIN tiergate_tenants t ON k.tenant = t.name WHERE k.revoked IS NULL"
)
# One statement per (tenant, day, key, tier) of a batch; rows go in sorted order, so two
# processes writing the same rows lock them in the same order and cannot deadlock.
UPSERT_USAGE = (
    "INSERT INTO tiergate_usage AS u VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
    "ON CONFLICT (tenant, day, key, tier) DO UPDATE SET "
    "requests = u.requests + excluded.requests, "
    "prompt_tokens = u.prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = u.completion_tokens + excluded.completion_tokens, "
    "cost_usd = u.cost_usd + excluded.cost_usd"
)
SPENT = (
    "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM tiergate_usage "
    "WHERE tenant = %s AND day >= %s"
)


def migrate(conn) -> list[int]:
    """Apply the migrations this database lacks; returns those applied. Safe to run from
    many processes at once: the advisory lock makes the others wait, then find nothing
    to do."""
    applied = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS tiergate_migrations "
            "(version integer PRIMARY KEY, applied double precision NOT NULL)"
        )
        done = {r[0] for r in conn.execute("SELECT version FROM tiergate_migrations")}
        for version, sql in MIGRATIONS:
            if version not in done:
                conn.execute(sql)
                conn.execute(
                    "INSERT INTO tiergate_migrations VALUES (%s, %s)", (version, time.time())
                )
                applied.append(version)
    return applied


def usage_rows(rows: Iterable[tuple]) -> list[tuple]:
    """Ledger rows (day, tenant, key, tier, requests, prompt, completion, cost) in the
    table's column order, sorted (see UPSERT_USAGE)."""
    return sorted((r[1], r[0], *r[2:]) for r in rows)


class PgAdmin:
    """The operator's side, with the SQLite store's methods (serving/tenants/cli.py)."""

    def __init__(self, url: str) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        migrate(self.conn)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PgAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _changed(self) -> None:
        """In the caller's transaction: every gateway reloads once it commits."""
        self.conn.execute("UPDATE tiergate_state SET version = version + 1 WHERE id = 1")
        self.conn.execute(f"NOTIFY {CHANNEL}")

    def set_tenant(self, t: Tenant) -> None:
        if t.name == "default":
            raise ValueError("the tenant name 'default' is reserved for server.api_keys")
        if t.budget_period not in ("day", "month"):
            raise ValueError(f"budget period must be day or month, not {t.budget_period!r}")
        with self.conn.transaction():
            self.conn.execute(
                "INSERT INTO tiergate_tenants VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (name) DO UPDATE SET tiers = excluded.tiers, rpm = excluded.rpm, "
                "tpm = excluded.tpm, max_concurrency = excluded.max_concurrency, "
                "budget_tokens = excluded.budget_tokens, "
                "budget_period = excluded.budget_period, budget_hard = excluded.budget_hard",
                (
                    t.name,
                    json.dumps(list(t.tiers)),
                    t.rpm,
                    t.tpm,
                    t.max_concurrency,
                    t.budget_tokens,
                    t.budget_period,
                    t.budget_hard,
                    time.time(),
                ),
            )
            self._changed()

    def tenants(self) -> list[Tenant]:
        rows = self.conn.execute(
            "SELECT name, tiers, rpm, tpm, max_concurrency, budget_tokens, budget_period, "
            "budget_hard FROM tiergate_tenants ORDER BY name"
        ).fetchall()
        return [tenant_of(r) for r in rows]

    def create_key(
        self,
        tenant: str,
        name: str,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrency: int | None = None,
    ) -> str:
        import psycopg

        found = self.conn.execute("SELECT 1 FROM tiergate_tenants WHERE name = %s", (tenant,))
        if not found.fetchone():
            raise ValueError(f"no tenant named {tenant!r}; create it with `tiergate keys tenant`")
        kid, key = keymod.new_key()
        try:
            with self.conn.transaction():
                self.conn.execute(
                    "INSERT INTO tiergate_keys VALUES (%s, %s, %s, %s, %s, %s, %s, %s, NULL)",
                    (kid, name, tenant, keymod.digest(key), rpm, tpm, max_concurrency, time.time()),
                )
                self._changed()
        except psycopg.errors.UniqueViolation as exc:
            raise ValueError(f"tenant {tenant!r} already has a key named {name!r}") from exc
        return key

    def keys(self) -> list[dict]:
        rows = self.conn.execute(
            f"SELECT {', '.join(KEY_FIELDS)} FROM tiergate_keys ORDER BY tenant, name"
        ).fetchall()
        return as_dicts(KEY_FIELDS, rows)

    def revoke(self, tenant: str, name: str) -> None:
        with self.conn.transaction():
            done = self.conn.execute(
                "UPDATE tiergate_keys SET revoked = %s "
                "WHERE tenant = %s AND name = %s AND revoked IS NULL",
                (time.time(), tenant, name),
            )
            if done.rowcount == 0:
                raise ValueError(f"tenant {tenant!r} has no live key named {name!r}")
            self._changed()

    def record(self, rows: Iterable[tuple]) -> None:
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.executemany(UPSERT_USAGE, usage_rows(rows))

    def spent(self, tenant: str, since: str) -> int:
        return int(self.conn.execute(SPENT, (tenant, since)).fetchone()[0])

    def usage(self, since: str = "") -> list[dict]:
        rows = self.conn.execute(
            "SELECT day::text, tenant, key, tier, requests, prompt_tokens, completion_tokens, "
            "cost_usd FROM tiergate_usage WHERE day >= %s::date "
            "ORDER BY day, tenant, key, tier",
            (since or "0001-01-01",),
        ).fetchall()
        return as_dicts(USAGE_FIELDS, rows)

    def prune(self, keep_days: int) -> int:
        """Delete usage rows older than `keep_days`; returns how many went."""
        done = self.conn.execute(
            "DELETE FROM tiergate_usage WHERE day < current_date - %s::integer", (keep_days,)
        )
        return done.rowcount
