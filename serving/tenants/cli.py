"""`tiergate keys`: tenants, their keys and their usage, for the operator.

    tiergate keys tenant team-a --tiers small medium --rpm 600 --tpm 200000
    tiergate keys create team-a ci-bot          # prints the key, once
    tiergate keys list
    tiergate keys revoke team-a ci-bot
    tiergate keys usage --since 2026-11-01

The store is the gateway's, found through the same config file (and environment) as
`tiergate serve`: `tenancy.database_url` (PostgreSQL, a fleet's), else `tenancy.db`
(default tenants.sqlite3 in the model cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from serving.config import ConfigError, load_settings
from serving.tenants.pg_store import PgAdmin
from serving.tenants.store import Tenant, TenantStore


def _store(a: argparse.Namespace) -> TenantStore | PgAdmin:
    if a.db:
        return TenantStore(a.db)
    settings = load_settings(a.config)  # the environment's TIERGATE_* too
    if settings.tenancy.database_url is not None:
        return PgAdmin(settings.tenancy.database_url.get_secret_value())
    return TenantStore(settings.tenancy_db())


def cmd_tenant(a: argparse.Namespace, store: TenantStore | PgAdmin) -> int:
    store.set_tenant(
        Tenant(
            a.name,
            tuple(a.tiers or ()),
            a.rpm,
            a.tpm,
            a.max_concurrency,
            a.budget_tokens,
            a.budget_period,
            not a.soft,
        )
    )
    print(f"tenant {a.name}: tiers {', '.join(a.tiers) if a.tiers else 'all'}")
    return 0


def cmd_create(a: argparse.Namespace, store: TenantStore | PgAdmin) -> int:
    key = store.create_key(a.tenant, a.name, a.rpm, a.tpm, a.max_concurrency)
    print(key)
    print("This is the only time the key is shown; the gateway keeps its SHA-256.", file=sys.stderr)
    return 0


def cmd_list(a: argparse.Namespace, store: TenantStore | PgAdmin) -> int:
    tenants = {t.name: t for t in store.tenants()}
    for k in store.keys():
        t = tenants[k["tenant"]]
        when = datetime.fromtimestamp(k["created"], UTC).strftime("%Y-%m-%d")
        state = "revoked" if k["revoked"] else "live"
        tiers = ",".join(t.tiers) or "all"
        print(f"{k['tenant']:<16} {k['name']:<20} tg-{k['id']}-…  {state:<7} {when}  tiers {tiers}")
    return 0


def cmd_revoke(a: argparse.Namespace, store: TenantStore | PgAdmin) -> int:
    store.revoke(a.tenant, a.name)
    print(f"revoked {a.tenant}/{a.name}: refused from the next request on")
    return 0


def cmd_usage(a: argparse.Namespace, store: TenantStore | PgAdmin) -> int:
    rows = store.usage(a.since or "")
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| day | tenant | key | tier | requests | prompt tokens | completion tokens | cost $ |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['day']} | {r['tenant']} | {r['key']} | {r['tier']} | {r['requests']} | "
            f"{r['prompt_tokens']} | {r['completion_tokens']} | {r['cost_usd']:.4f} |"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiergate keys", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=None, help="YAML (configs/default.yaml)")
    p.add_argument("--db", type=Path, help="the SQLite file, instead of the config's")
    sub = p.add_subparsers(dest="command", required=True)

    def limits(q: argparse.ArgumentParser) -> None:
        q.add_argument("--rpm", type=int, help="requests per minute")
        q.add_argument("--tpm", type=int, help="prompt + completion tokens per minute")
        q.add_argument("--max-concurrency", type=int, help="requests in flight at once")

    t = sub.add_parser("tenant", help="create or update a tenant")
    t.add_argument("name")
    t.add_argument("--tiers", nargs="+", help="tiers it may use (default: all)")
    limits(t)
    t.add_argument("--budget-tokens", type=int, help="tokens per period")
    t.add_argument("--budget-period", choices=["day", "month"], default="month")
    t.add_argument("--soft", action="store_true", help="a soft budget: warn, do not refuse")
    t.set_defaults(func=cmd_tenant)
    c = sub.add_parser("create", help="a new key for a tenant; printed once")
    c.add_argument("tenant")
    c.add_argument("name")
    limits(c)
    c.set_defaults(func=cmd_create)
    sub.add_parser("list", help="keys (never their secrets)").set_defaults(func=cmd_list)
    r = sub.add_parser("revoke", help="refuse a key from the next request on")
    r.add_argument("tenant")
    r.add_argument("name")
    r.set_defaults(func=cmd_revoke)
    u = sub.add_parser("usage", help="requests, tokens and cost per tenant, key, tier and day")
    u.add_argument("--since", help="YYYY-MM-DD")
    u.add_argument("--json", action="store_true")
    u.set_defaults(func=cmd_usage)
    return p


def main(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    try:
        store = _store(a)
    except ConfigError as exc:
        print(f"tiergate keys: error: {exc}", file=sys.stderr)
        return 2
    try:
        return a.func(a, store)
    except ValueError as exc:
        print(f"tiergate keys: error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
