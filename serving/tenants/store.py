"""Tenants, keys and the usage ledger in SQLite: the embedded default, nothing to run.
(A fleet's routers share PostgreSQL instead: serving/tenants/pg_store.py.)

The gateway looks a key up on every request (one indexed read, ~10 us) instead of
caching it, so `tiergate keys revoke` takes effect on the next request, in every
gateway process that shares the file.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from serving.tenants import keys as keymod

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    name TEXT PRIMARY KEY,
    tiers TEXT NOT NULL,            -- JSON list; [] means every tier
    rpm INTEGER, tpm INTEGER, max_concurrency INTEGER,
    budget_tokens INTEGER, budget_period TEXT NOT NULL DEFAULT 'month',
    budget_hard INTEGER NOT NULL DEFAULT 1,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL REFERENCES tenants(name),
    digest BLOB NOT NULL,
    rpm INTEGER, tpm INTEGER, max_concurrency INTEGER,
    created REAL NOT NULL,
    revoked REAL,
    UNIQUE (tenant, name)
);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL, tenant TEXT NOT NULL, key TEXT NOT NULL, tier TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
    PRIMARY KEY (day, tenant, key, tier)
);
"""


@dataclass(frozen=True)
class Tenant:
    name: str
    tiers: tuple[str, ...]  # empty: every tier
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None
    budget_tokens: int | None = None
    budget_period: str = "month"
    budget_hard: bool = True


@dataclass(frozen=True)
class Scope:
    """Limits counted together: a tenant's (all its keys), or one key's own."""

    id: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrency)


@dataclass(frozen=True)
class Budget:
    tokens: int  # prompt + completion tokens per period
    period: str  # "day" or "month" (UTC)
    hard: bool  # refuse once spent (429 insufficient_quota); soft: serve on, still counted


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the tenant, the key's name, what it may use, and the limit
    scopes it counts against (its tenant's, and its key's where the key narrows them)."""

    tenant: str
    key: str
    tiers: frozenset[str] | None  # None: every tier
    scopes: tuple[Scope, ...] = ()
    budget: Budget | None = None

    def may_use(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers

    def tightest(self, limit: str) -> int | None:
        values = [getattr(s, limit) for s in self.scopes if getattr(s, limit)]
        return min(values) if values else None


# The operator's listings, in both stores' column order.
KEY_FIELDS = ("id", "name", "tenant", "created", "revoked")
USAGE_FIELDS = ("day", "tenant", "key", "tier", "requests", "prompt_tokens")
USAGE_FIELDS += ("completion_tokens", "cost_usd")


def as_dicts(fields: tuple[str, ...], rows: Iterable[tuple]) -> list[dict]:
    return [dict(zip(fields, r, strict=True)) for r in rows]


def tenant_of(row: tuple) -> Tenant:
    """name, tiers, rpm, tpm, max_concurrency, budget tokens, period, hard."""
    tiers = json.loads(row[1]) if isinstance(row[1], str) else row[1]
    return Tenant(row[0], tuple(tiers), *row[2:7], bool(row[7]))


class GatewayStore(Protocol):
    """What the gateway asks of a store (SQLite's TenantStore, PostgreSQL's PgTenancy in
    serving/tenants/pg_gateway.py): one interface, whichever holds the keys."""

    def lookup(self, key: str) -> Principal | None: ...

    def record(self, rows: Iterable[tuple[str, str, str, str, int, int, int, float]]) -> None: ...

    def spent(self, tenant: str, since: str) -> int: ...

    async def run(self) -> None: ...

    async def aclose(self) -> None: ...


# What a key's row and its tenant's say about a caller, in principal_of's order; both
# stores select these (k: keys, t: tenants).
PRINCIPAL_COLUMNS = (
    "k.name, k.tenant, t.tiers, k.rpm, t.rpm, k.tpm, t.tpm, k.max_concurrency, "
    "t.max_concurrency, t.budget_tokens, t.budget_period, t.budget_hard"
)


def principal_of(row: tuple) -> Principal:
    """A caller from PRINCIPAL_COLUMNS. A key may narrow its tenant's limits (its own
    scope), never widen them: the tenant's scope counts every key's requests."""
    name, tenant, tiers = row[0], row[1], row[2]
    if isinstance(tiers, str):  # SQLite keeps JSON text; Postgres hands back the list
        tiers = json.loads(tiers)
    scopes = [Scope(f"t:{tenant}", row[4], row[6], row[8])]
    key_scope = Scope(f"k:{tenant}/{name}", row[3], row[5], row[7])
    if key_scope.limited:
        scopes.append(key_scope)
    return Principal(
        tenant=tenant,
        key=name,
        tiers=frozenset(tiers) if tiers else None,
        scopes=tuple(s for s in scopes if s.limited),
        budget=Budget(row[9], row[10], bool(row[11])) if row[9] else None,
    )


class TenantStore:
    """The SQLite store: the operator's side (`tiergate keys`) and the gateway's."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the CLI's writes
        # WAL + NORMAL: a commit appends to the log without an fsync (the gateway writes
        # from its event loop); a power cut may lose the last second of usage, never the
        # file's consistency.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(_SCHEMA)
        self._version: int | None = None
        self._cache: dict[bytes, Principal | None] = {}  # by key digest, never the key

    def close(self) -> None:
        self.db.close()

    async def run(self) -> None:
        """Nothing to watch: every lookup asks the file whether it changed."""

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> TenantStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- operator side (the `tiergate keys` CLI) --

    def set_tenant(self, t: Tenant) -> None:
        self._cache = {}  # this connection's own writes do not move data_version
        if t.name == "default":  # the operator's: config-file keys (serving/tenants/auth.py)
            raise ValueError("the tenant name 'default' is reserved for server.api_keys")
        if t.budget_period not in ("day", "month"):
            raise ValueError(f"budget period must be day or month, not {t.budget_period!r}")
        self.db.execute(
            "INSERT INTO tenants VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
            "tiers=excluded.tiers, rpm=excluded.rpm, tpm=excluded.tpm, "
            "max_concurrency=excluded.max_concurrency, budget_tokens=excluded.budget_tokens, "
            "budget_period=excluded.budget_period, budget_hard=excluded.budget_hard",
            (
                t.name,
                json.dumps(list(t.tiers)),
                t.rpm,
                t.tpm,
                t.max_concurrency,
                t.budget_tokens,
                t.budget_period,
                int(t.budget_hard),
                time.time(),
            ),
        )

    def tenants(self) -> list[Tenant]:
        rows = self.db.execute(
            "SELECT name, tiers, rpm, tpm, max_concurrency, budget_tokens, budget_period, "
            "budget_hard FROM tenants ORDER BY name"
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
        """A new key for `tenant`; the only time the key itself exists on this side."""
        if not self.db.execute("SELECT 1 FROM tenants WHERE name=?", (tenant,)).fetchone():
            raise ValueError(f"no tenant named {tenant!r}; create it with `tiergate keys tenant`")
        kid, key = keymod.new_key()
        self._cache = {}
        try:
            self.db.execute(
                "INSERT INTO keys VALUES (?,?,?,?,?,?,?,?,NULL)",
                (kid, name, tenant, keymod.digest(key), rpm, tpm, max_concurrency, time.time()),
            )
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"tenant {tenant!r} already has a key named {name!r}") from exc
        return key

    def keys(self) -> list[dict]:
        rows = self.db.execute(
            f"SELECT {', '.join(KEY_FIELDS)} FROM keys ORDER BY tenant, name"
        ).fetchall()
        return as_dicts(KEY_FIELDS, rows)

    def revoke(self, tenant: str, name: str) -> None:
        self._cache = {}
        done = self.db.execute(
            "UPDATE keys SET revoked=? WHERE tenant=? AND name=? AND revoked IS NULL",
            (time.time(), tenant, name),
        )
        if done.rowcount == 0:
            raise ValueError(f"tenant {tenant!r} has no live key named {name!r}")

    # -- gateway side --

    def lookup(self, key: str) -> Principal | None:
        """The principal behind a live key; None for an unknown, revoked or wrong one.

        Answers are kept until the file changes: `PRAGMA data_version` moves when any
        other connection (the CLI's revoke, a tenant's new limits) commits, and costs
        no table read, so a revoke still acts on the very next request."""
        version = self.db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:
            self._version, self._cache = version, {}
        digest = keymod.digest(key)
        if digest in self._cache:
            return self._cache[digest]
        found = self._lookup(key)
        if found is not None or len(self._cache) < 10_000:  # bounded against junk keys
            self._cache[digest] = found
        return found

    def _lookup(self, key: str) -> Principal | None:
        kid = keymod.key_id(key)
        if kid is None:
            return None
        row = self.db.execute(
            f"SELECT k.digest, {PRINCIPAL_COLUMNS} FROM keys k JOIN tenants t "
            "ON k.tenant = t.name WHERE k.id=? AND k.revoked IS NULL",
            (kid,),
        ).fetchone()
        if row is None or not keymod.matches(key, row[0]):
            return None
        return principal_of(row[1:])

    def record(self, rows: Iterable[tuple[str, str, str, str, int, int, int, float]]) -> None:
        """Add (day, tenant, key, tier, requests, prompt, completion, cost) to the ledger,
        in one transaction."""
        self.db.execute("BEGIN")  # one commit, not one per row (the connection autocommits)
        try:
            self._record(rows)
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _record(self, rows: Iterable[tuple[str, str, str, str, int, int, int, float]]) -> None:
        self.db.executemany(
            "INSERT INTO usage VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
            "requests=requests+excluded.requests, "
            "prompt_tokens=prompt_tokens+excluded.prompt_tokens, "
            "completion_tokens=completion_tokens+excluded.completion_tokens, "
            "cost_usd=cost_usd+excluded.cost_usd",
            list(rows),
        )

    def spent(self, tenant: str, since: str) -> int:
        """Prompt + completion tokens the tenant used from day `since` (YYYY-MM-DD) on."""
        row = self.db.execute(
            "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0) FROM usage "
            "WHERE tenant=? AND day >= ?",
            (tenant, since),
        ).fetchone()
        return int(row[0])

    def usage(self, since: str = "") -> list[dict]:
        rows = self.db.execute(
            "SELECT day, tenant, key, tier, requests, prompt_tokens, completion_tokens, "
            "cost_usd FROM usage WHERE day >= ? ORDER BY day, tenant, key, tier",
            (since,),
        ).fetchall()
        return as_dicts(USAGE_FIELDS, rows)
