"""Which HTTP client should relay streams to the engines? The CPU each spends per
streamed request, side by side in one process pinned to one core, against a FAKE
upstream on the other core (16 events per stream, no delay).

    python -m benchmarks.studies.client_choice --requests 3000 --concurrency 64 --rounds 3

Each client reads every stream chunk by chunk, as a relay must, and rounds alternate
(ABBA) so drift hits both alike. Reports CPU microseconds per request and req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time

import aiohttp
import httpx

from benchmarks.launch import free_port
from benchmarks.studies.gateway_capacity import started

BODY = json.dumps(
    {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 16,
        "stream": True,
    }
).encode()


async def with_httpx(url: str, n: int, c: int) -> None:
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        sem = asyncio.Semaphore(c)

        async def one() -> None:
            async with sem:
                req = http.build_request(
                    "POST", url, content=BODY, headers={"content-type": "application/json"}
                )
                r = await http.send(req, stream=True)
                async for _ in r.aiter_raw():
                    pass
                await r.aclose()

        await asyncio.gather(*(one() for _ in range(n)))


async def with_aiohttp(url: str, n: int, c: int) -> None:
    connector = aiohttp.TCPConnector(limit=c)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as http:
        sem = asyncio.Semaphore(c)

        async def one() -> None:
            async with sem:
                async with http.post(
                    url, data=BODY, headers={"content-type": "application/json"}
                ) as r:
                    while await r.content.readany():
                        pass

        await asyncio.gather(*(one() for _ in range(n)))


CLIENTS = {"httpx": with_httpx, "aiohttp": with_aiohttp}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu", default="0")
    p.add_argument("--upstream-cpu", default="1")
    a = p.parse_args(argv)
    import uvloop

    os.sched_setaffinity(0, {int(a.cpu)})
    port = free_port()
    fake = [
        sys.executable,
        "-m",
        "benchmarks.studies.fake_server",
        "--port",
        str(port),
        "--events",
        "16",
    ]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in CLIENTS}
    with started(fake, a.upstream_cpu, f"http://127.0.0.1:{port}/health"):
        for i in range(a.rounds):
            for name in CLIENTS if i % 2 == 0 else list(CLIENTS)[::-1]:
                cpu0, t0 = time.process_time(), time.perf_counter()
                uvloop.run(CLIENTS[name](url, a.requests, a.concurrency))
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
                results[name].append((cpu * 1e6 / a.requests, a.requests / wall))
                print(
                    f"round {i + 1} {name}: {results[name][-1][0]:.0f} us CPU/request, "
                    f"{results[name][-1][1]:.0f} req/s",
                    flush=True,
                )
    print("| client | CPU us per streamed request (median) | req/s (median) | rounds |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        print(
            f"| {name} | {statistics.median(r[0] for r in rows):.0f} | "
            f"{statistics.median(r[1] for r in rows):.0f} | {len(rows)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
