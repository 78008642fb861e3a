"""What tenancy adds per request, part by part (timeit, one core): the key lookup in
SQLite, the limits (admit and release, in process), the budget check and the ledger.

    python -m benchmarks.studies.tenancy_cost
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import timeit
from pathlib import Path

from serving.tenants.auth import Authenticator
from serving.tenants.limits import TenantLimiter
from serving.tenants.store import Tenant, TenantStore
from serving.tenants.usage import UsageLedger


def per_call_us(fn, n: int) -> float:
    """The median of 5 runs of n calls, in microseconds per call."""
    return statistics.median(timeit.repeat(fn, number=n, repeat=5)) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=20000)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, TenantStore(Path(tmp) / "t.sqlite3") as store:
        for i in range(50):  # a store with some tenants and keys in it
            store.set_tenant(Tenant(f"team-{i}", ("small",), rpm=10**9, tpm=10**12))
            store.create_key(f"team-{i}", "k")
        store.set_tenant(
            Tenant("bench", (), rpm=10**9, tpm=10**12, max_concurrency=10**6, budget_tokens=10**15)
        )
        key = store.create_key("bench", "wrk")
        auth = Authenticator(["operator"], store)
        who = auth(f"Bearer {key}")
        limiter, ledger = TenantLimiter(), UsageLedger(store)
        usage = {"prompt_tokens": 20, "completion_tokens": 16, "total_tokens": 36}

        def limits() -> None:
            limiter.admit_now(who, 16, 1.0).release(1.0, usage)

        parts = {
            "key lookup (SQLite, digest, compare)": lambda: auth(f"Bearer {key}"),
            "config key (compare only)": lambda: auth("Bearer operator"),
            "limits: admit + release (rpm, tpm, in flight)": limits,
            "budget check (ledger, cached read)": lambda: ledger.spent("bench", "month"),
            "ledger add (in memory)": lambda: ledger.add("bench", "wrk", "small", usage, 0.0),
        }
        total = 0.0
        print("| part | us per request |")
        print("|---|---|")
        for name, fn in parts.items():
            us = per_call_us(fn, a.n)
            total += us if name != "config key (compare only)" else 0.0
            print(f"| {name} | {us:.2f} |")
        ledger.flush()
        print(f"| **all of a tenant request's checks** | **{total:.2f}** |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
