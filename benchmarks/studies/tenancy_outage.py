"""PostgreSQL stopped under load: what a fleet's gateway answers meanwhile, and after.

Two gateways (in this process, each with its own key snapshot, LISTEN connection and
ledger) share a throwaway PostgreSQL, in front of a FAKE engine; 8 clients send chats
with one tenant key through both; PostgreSQL is stopped for `--outage` seconds, then
started again. Counted by phase: statuses, 500s, what a key no gateway holds gets (503
down, 401 after), how soon a key made after recovery works, and whether the usage
written equals the requests served.

    python -m benchmarks.studies.tenancy_outage --outage 30
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter

from serving.config import Settings
from serving.tenants.pg_store import PgAdmin
from serving.tenants.store import Tenant
from tests.fake_engine import FakeEngine, in_process_gateway
from tests.postgres import PgServer, binaries

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def run(outage: float, before: float, after: float) -> dict:
    pg = PgServer(binaries()).start()
    try:
        with PgAdmin(pg.url) as admin:
            admin.set_tenant(Tenant("team-a", (), rpm=10**6))
            key = admin.create_key("team-a", "ci")
        with FakeEngine("ok") as engine:
            settings = Settings(
                engines=[{"name": "e", "model": "m", "url": engine.url}],
                tenancy={"enabled": True, "database_url": pg.url},
                timeouts={"health_interval": 0.5},
            )
            async with in_process_gateway(settings) as a, in_process_gateway(settings) as b:
                await asyncio.sleep(1.0)
                phases: dict[str, Counter] = {p: Counter() for p in ("before", "down", "after")}
                phase = "before"
                stop = False
                headers = {"authorization": f"Bearer {key}"}

                async def client(i: int) -> None:
                    gw = (a, b)[i % 2]
                    while not stop:
                        r = await gw.post("/v1/chat/completions", json=BODY, headers=headers)
                        phases[phase][r.status_code] += 1
                        await asyncio.sleep(0.01)

                tasks = [asyncio.create_task(client(i)) for i in range(8)]
                await asyncio.sleep(before)
                stranger = {"authorization": "Bearer tg-0badc0de-" + "x" * 43}  # never made
                pg.stop()
                phase, down_at = "down", time.monotonic()
                await asyncio.sleep(0.5)
                unknown = await a.post("/v1/chat/completions", json=BODY, headers=stranger)
                unknown_status = unknown.status_code
                await asyncio.sleep(max(0.0, outage - (time.monotonic() - down_at)))
                pg.start()
                phase, up_at = "after", time.monotonic()
                with PgAdmin(pg.url) as admin:  # a key made after recovery reaches both
                    late = admin.create_key("team-a", "late")
                recovered = None
                while recovered is None and time.monotonic() - up_at < 30:
                    r = await b.post(
                        "/v1/chat/completions",
                        json=BODY,
                        headers={"authorization": f"Bearer {late}"},
                    )
                    if r.status_code == 200:
                        recovered = time.monotonic() - up_at
                    await asyncio.sleep(0.1)
                unknown_after = (
                    await a.post("/v1/chat/completions", json=BODY, headers=stranger)
                ).status_code
                await asyncio.sleep(after)
                stop = True
                await asyncio.gather(*tasks)
        with PgAdmin(pg.url) as admin:
            written = sum(r["requests"] for r in admin.usage() if r["key"] == "ci")
    finally:
        pg.close()
    served = sum(c[200] for c in phases.values())
    return {
        "outage_s": outage,
        "statuses": {p: dict(c) for p, c in phases.items()},
        "answers_500": sum(c[500] for c in phases.values()),
        "unknown_key_during_outage": unknown_status,
        "unknown_key_after": unknown_after,
        "key_made_after_recovery_works_after_s": recovered,
        "served_ok": served,
        "ledger_requests": written,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outage", type=float, default=30.0)
    p.add_argument("--before", type=float, default=5.0)
    p.add_argument("--after", type=float, default=5.0)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a.outage, a.before, a.after)), indent=1))


if __name__ == "__main__":
    main()
