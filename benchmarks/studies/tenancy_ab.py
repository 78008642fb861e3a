"""The whole hot path with tenancy on against off, in one process: the gateway app
in-process (httpx's ASGI transport), a FAKE engine behind it, CPU time per request
(everything in the process: client, gateway, fake), three alternating rounds.

    python -m benchmarks.studies.tenancy_ab
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from serving.config import Settings
from serving.tenants.store import Tenant, TenantStore
from tests.fake_engine import FakeEngine, in_process_gateway

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def cpu_us_per_request(settings: Settings, key: str, n: int) -> float:
    async with in_process_gateway(settings) as client:
        headers = {"authorization": f"Bearer {key}"}
        for _ in range(200):  # warm-up
            await client.post("/v1/chat/completions", json=BODY, headers=headers)
        runs = []
        for _ in range(5):
            t = time.process_time()
            for _ in range(n):
                r = await client.post("/v1/chat/completions", json=BODY, headers=headers)
                assert r.status_code == 200, r.text
            runs.append((time.process_time() - t) / n * 1e6)
        return statistics.median(runs)


async def main() -> None:
    db = Path(tempfile.mkdtemp()) / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(
            Tenant("bench", (), rpm=10**9, tpm=10**12, max_concurrency=10**6, budget_tokens=10**15)
        )
        key = store.create_key("bench", "k")
    with FakeEngine("ok") as engine:
        base = {
            "engines": [{"name": "e", "model": "m", "url": engine.url}],
            "timeouts": {"health_interval": 1.0},
            "server": {"api_keys": ["bench-key"]},
        }
        off = Settings(**base)
        on = Settings(**base, tenancy={"enabled": True, "db": str(db)})
        result: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(3):
            result["off"].append(await cpu_us_per_request(off, "bench-key", 400))
            result["on"].append(await cpu_us_per_request(on, key, 400))
    print({k: [round(x) for x in v] for k, v in result.items()})
    off_us, on_us = statistics.median(result["off"]), statistics.median(result["on"])
    print(f"CPU per request: off {off_us:.0f} us, on {on_us:.0f} us, +{on_us - off_us:.0f} us")


if __name__ == "__main__":
    asyncio.run(main())
