"""Load accounting survives cancellation: thousands of clients that leave at random
moments (before sending, mid-headers, mid-stream, after the end) against a FAKE engine
that streams like decode steps. Every count must return to 0 and nothing may wedge.
The gateway runs on a real uvicorn server (the product's own config and HTTP protocol),
so disconnects are real TCP closes."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import pytest

from serving.config import Settings
from tests.fake_engine import FakeEngine, served

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def test_counts_return_to_zero_after_random_disconnects() -> None:
    with FakeEngine(force="drip") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            timeouts={"health_interval": 0.1},
            router={"affinity": False, "spill": {"max_in_flight": 100000}},
            server={"max_loop_lag_ms": 0},
        )
        rng = random.Random(7)
        outcomes = {"done": 0, "cut": 0}
        async with served(settings) as (app, url), aiohttp.ClientSession() as http:
            limit = asyncio.Semaphore(64)

            async def one(i: int) -> None:
                body = {
                    "model": "m",
                    "messages": [{"role": "user", "content": f"hi {i}"}],
                    "stream": i % 4 != 0,
                }

                async def call() -> None:
                    async with http.post(url + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
                        await r.read()

                async with limit:
                    try:  # a stream takes ~200 ms unloaded: leave anywhere in 0-600 ms
                        await asyncio.wait_for(call(), timeout=rng.uniform(0, 0.6))
                        outcomes["done"] += 1
                    except TimeoutError:
                        outcomes["cut"] += 1

            await asyncio.gather(*(one(i) for i in range(2000)))
            await asyncio.sleep(0.5)  # let the gateway see the last closes
            async with http.get(url + "/metrics") as r:
                metrics = await r.text()
            # a fresh request still works: nothing is wedged (breaker, slots)
            async with http.post(
                url + "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
            ) as r:
                assert r.status == 200
            assert outcomes["done"] > 50 and outcomes["cut"] > 300, outcomes
            registry = app.state.registry
            assert [ep.in_flight for ep in registry.endpoints] == [0]
            assert app.state.hot.in_flight == 0
            assert registry.get("e").breaker.state == "closed"
            assert _metric(metrics, "tiergate_requests_in_flight{") == 0
            assert _metric(metrics, "tiergate_client_disconnects_total{") > 0


async def test_a_client_leaving_a_silent_stream_frees_it_at_once() -> None:
    # The engine sends two events, then nothing for 30 s: only the disconnect can end it.
    with FakeEngine(force="stall-stream") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            timeouts={"health_interval": 0.1},
        )
        async with served(settings) as (app, url), aiohttp.ClientSession() as http:
            endpoint = app.state.registry.get("e")
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                assert b"one" in await r.content.readuntil(b"\n\n")
                assert endpoint.in_flight == 1
            # the response is closed here: the client has gone
            for _ in range(40):
                if endpoint.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert endpoint.in_flight == 0  # within 2 s, not 30
            assert app.state.hot.in_flight == 0


async def test_counts_return_to_zero_when_refusals_and_disconnects_mix() -> None:
    """The gateway's own limit refuses part of the load (from the parser callback and
    from the hand-read head) while clients leave at random moments: the slots, the
    replica's count and the gauges still return to 0, and every answer is a 200 or the
    limit's 429."""
    with FakeEngine(force="drip") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            timeouts={"health_interval": 0.1},
            router={"affinity": False, "spill": {"max_in_flight": 100000}},
            server={"max_in_flight": 12, "max_loop_lag_ms": 0},
        )
        rng = random.Random(11)
        outcomes = {200: 0, 429: 0, "cut": 0}
        async with served(settings) as (app, url), aiohttp.ClientSession() as http:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}

            async def call() -> None:
                async with http.post(url + "/v1/chat/completions", json=body) as r:
                    assert r.status in (200, 429), await r.text()
                    if r.status == 429:
                        error = (await r.json())["error"]
                        assert error["code"] == "rate_limit_exceeded"
                    else:
                        await r.read()
                    outcomes[r.status] += 1

            async def client(end: float) -> None:
                # For a fixed time, not a fixed count: a fast host answers the 429s so
                # quickly that 800 requests left too few streams admitted to cut.
                while asyncio.get_running_loop().time() < end:
                    # half leave within 0.15 s (before sending, or mid-stream: a stream
                    # takes ~200 ms), half stay to the end
                    leave = rng.uniform(0, 0.15) if rng.random() < 0.5 else 5.0
                    try:
                        await asyncio.wait_for(call(), timeout=leave)
                    except TimeoutError:
                        outcomes["cut"] += 1

            end = asyncio.get_running_loop().time() + 2.5
            await asyncio.gather(*(client(end) for _ in range(48)))
            await asyncio.sleep(0.5)  # let the gateway see the last closes
            async with http.get(url + "/metrics") as r:
                metrics = await r.text()
            assert outcomes[200] > 5 and outcomes[429] > 100 and outcomes["cut"] > 20, outcomes
            refused = _metric(metrics, 'tiergate_admission_refused_total{reason="in_flight"}')
            assert refused >= outcomes[429]  # a cut client may have been refused unread
            assert app.state.hot.in_flight == 0
            assert [ep.in_flight for ep in app.state.registry.endpoints] == [0]
            assert _metric(metrics, "tiergate_requests_in_flight{") == 0
            assert len(fake.app.state.seen) <= outcomes[200] + outcomes["cut"]
            async with http.post(url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200  # nothing wedged: a slot is free again
                await r.read()
