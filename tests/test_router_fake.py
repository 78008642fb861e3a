"""Router faults the real engine cannot produce on demand, against FAKE engines:
a stalled replica trips its breaker, and saturation answers 429 with Retry-After."""

from __future__ import annotations

import asyncio

import pytest

from serving.config import Settings
from tests.fake_engine import FakeEngine, in_process_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _chat(model: str = "m") -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


async def test_stalled_replica_trips_breaker_and_stops_getting_traffic() -> None:
    with FakeEngine(force="stall") as stalled, FakeEngine(force="ok") as healthy:
        settings = Settings(
            engines=[
                {"name": "stalled", "model": "m", "url": stalled.url},
                {"name": "healthy", "model": "m", "url": healthy.url},
            ],
            timeouts={"read": 0.3, "health_interval": 0.1},
            router={
                "breaker": {"failures": 2, "cooldown": 60},
                "affinity": False,
                "retry": {"max_attempts": 2, "min_retries": 100},
            },
        )
        async with in_process_gateway(settings) as client:
            results = [await client.post("/v1/chat/completions", json=_chat()) for _ in range(10)]
            metrics = (await client.get("/metrics")).text
        # Every request succeeded: the stalled replica's timeouts were retried on the other.
        assert [r.status_code for r in results] == [200] * 10
        assert {r.headers["x-tiergate-replica"] for r in results} == {"healthy"}
        # The stalled replica got exactly `failures` requests, then its breaker opened.
        assert len(stalled.app.state.seen) == 2
        assert len(healthy.app.state.seen) == 10
        assert 'tiergate_circuit_state{replica="stalled"} 2.0' in metrics
        assert (
            'tiergate_retries_total{reason="upstream_timeout",replica="healthy",tier="m"} 2.0'
            in (metrics)
        )


async def test_all_replicas_saturated_is_429_with_retry_after() -> None:
    with FakeEngine(force="slow") as slow:
        settings = Settings(
            engines=[{"name": "slow", "model": "m", "url": slow.url}],
            timeouts={"health_interval": 0.1},
            router={"spill": {"max_in_flight": 1, "retry_after_s": 3}, "scrape_interval": 0.1},
        )
        async with in_process_gateway(settings) as client:
            first = asyncio.create_task(client.post("/v1/chat/completions", json=_chat()))
            await asyncio.sleep(0.3)  # the first now occupies the only slot
            second = await client.post("/v1/chat/completions", json=_chat())
            assert second.status_code == 429
            assert second.headers["retry-after"] == "3"
            err = second.json()["error"]
            assert (err["type"], err["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert (await first).status_code == 200  # nothing was lost
            # The engine's own queue counts too: a scraped backlog also gives 429.
            slow.app.state.waiting = 50.0
            await asyncio.sleep(0.4)
            third = await client.post("/v1/chat/completions", json=_chat())
            assert third.status_code == 429
        assert len(slow.app.state.seen) == 1


async def test_full_tier_spills_to_the_next_in_order() -> None:
    with FakeEngine(force="ok") as busy, FakeEngine(force="ok") as idle:
        settings = Settings(
            engines=[
                {"name": "busy", "model": "m-small", "url": busy.url},
                {"name": "idle", "model": "m-large", "url": idle.url},
            ],
            tiers=[
                {"name": "small", "model": "small", "engines": ["busy"]},
                {"name": "large", "model": "large", "engines": ["idle"]},
            ],
            timeouts={"health_interval": 0.1},
            router={
                "order": ["small", "large"],
                "scrape_interval": 0.1,
                "spill": {"max_waiting": 4},
            },
        )
        busy.app.state.waiting = 10.0
        async with in_process_gateway(settings) as client:
            await asyncio.sleep(0.3)  # one scrape of the backlog
            r = await client.post("/v1/chat/completions", json=_chat("small"))
            metrics = (await client.get("/metrics")).text
        assert r.status_code == 200
        assert r.headers["x-tiergate-tier"] == "large"
        assert r.headers["x-tiergate-reason"] == "explicit+spill"
        assert busy.app.state.seen == []
        assert 'tiergate_spills_total{from_tier="small",to_tier="large"} 1.0' in metrics


async def test_an_engine_that_becomes_ready_again_starts_with_a_closed_breaker() -> None:
    from serving.metrics import GatewayMetrics
    from serving.router.breaker import CircuitBreaker
    from serving.router.registry import Endpoint, EngineRegistry
    from serving.upstream.client import UpstreamClient
    from serving.upstream.health import check_once

    with FakeEngine(force="ok") as fake:
        registry = EngineRegistry()
        ep = Endpoint(name="e", model="m", url=fake.url, state="external")
        ep.breaker = CircuitBreaker(1, cooldown=600)
        registry.add(ep)
        ep.breaker.failure(0.0)  # opened by failures while the engine was down
        assert ep.breaker.state == "open" and not ep.ready
        http = UpstreamClient(Settings(engines=[{"name": "e", "model": "m"}]).timeouts, 4)
        await http.start()
        try:
            await check_once(http, registry, GatewayMetrics(), 2.0)  # its /health answers
        finally:
            await http.close()
        assert ep.ready and ep.breaker.state == "closed"


async def test_the_scrape_asks_for_the_load_alone_and_falls_back_to_the_whole_text() -> None:
    from serving.metrics import GatewayMetrics
    from serving.router.load import FILTERED_PATH, FULL_PATH, EngineLoad
    from serving.router.registry import Endpoint
    from serving.upstream.client import UpstreamClient
    from serving.upstream.health import scrape

    http = UpstreamClient(Settings(engines=[{"name": "e", "model": "m"}]).timeouts, 4)
    await http.start()
    try:
        # Nothing listens: no answer, so nothing is concluded about the engine.
        gone = Endpoint(name="gone", model="m", url="http://127.0.0.1:1", ready=True)
        await scrape(http, gone, 2.0, GatewayMetrics())
        assert gone.scrape_path == FILTERED_PATH
        for mode, path in (("load", FILTERED_PATH), ("none", FULL_PATH), ("empty", FULL_PATH)):
            with FakeEngine(force="ok") as fake:
                fake.app.state.filtered, fake.app.state.waiting = mode, 3.0
                ep = Endpoint(name="e", model="m", url=fake.url, ready=True, state="external")
                metrics = GatewayMetrics()
                await scrape(http, ep, 2.0, metrics)
                await scrape(http, ep, 2.0, metrics)
                assert ep.scrape_path == path, mode
                assert ep.load.waiting == 3.0, mode  # read either way
                text = metrics.exposition().decode()
                assert 'tiergate_engine_requests_waiting{engine="e"} 3.0' in text, mode
                asked = fake.app.state.scraped
                if mode == "load":  # the filtered answer each time, never the whole text
                    assert asked == [FILTERED_PATH] * 2
                else:  # once filtered, then the whole text only
                    assert asked == [FILTERED_PATH, FULL_PATH, FULL_PATH], mode
        # A 5xx there is the engine's trouble: the path stays, the last load is kept.
        with FakeEngine(force="ok") as fake:
            fake.app.state.filtered = "error"
            ep = Endpoint(name="e", model="m", url=fake.url, ready=True, state="external")
            ep.load = EngineLoad(waiting=5.0)
            await scrape(http, ep, 2.0, GatewayMetrics())
            assert ep.scrape_path == FILTERED_PATH and ep.load.waiting == 5.0
            assert fake.app.state.scraped == [FILTERED_PATH]
    finally:
        await http.close()


async def _while_down(settings: Settings, port: int, back_after: float | None) -> tuple[int, float]:
    """A gateway whose one FAKE engine answers, then stops; `back_after` s later another
    starts on the same port (None: never). The status of a request sent while it is
    down, and how long its answer took."""
    engines = [FakeEngine(force="ok", port=port).__enter__()]
    try:
        async with in_process_gateway(settings) as client:
            assert (await client.post("/v1/chat/completions", json=_chat())).status_code == 200
            ep = client.app.state.registry.endpoints[0]
            engines.pop().__exit__()
            while ep.ready:  # noqa: ASYNC110 (the health loop sees it go)
                await asyncio.sleep(0.05)
            loop = asyncio.get_running_loop()
            if back_after is not None:
                loop.call_later(
                    back_after,
                    lambda: engines.append(FakeEngine(force="ok", port=port).__enter__()),
                )
            started = loop.time()
            r = await client.post("/v1/chat/completions", json=_chat(), timeout=30)
            return r.status_code, loop.time() - started
    finally:
        for engine in engines:
            engine.__exit__()


async def test_a_request_waits_for_a_restarting_engine() -> None:
    """router.wait_ready_s (60 s by default) holds a request while a replica that was up
    is down, until it is back; one never seen up, or wait_ready_s 0, is 503 at once."""
    never = FakeEngine(force="ok")  # its port: nothing listens there
    base = {"engines": [{"name": "late", "model": "m", "url": never.url}]}
    base["timeouts"] = {"health_interval": 0.1}
    async with in_process_gateway(Settings(**base)) as client:
        r = await client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 503  # never seen up: nothing to wait for
        assert r.json()["error"]["code"] == "no_engine_ready" and r.headers["retry-after"] == "1"
    status, took = await _while_down(Settings(**base), never.port, back_after=1.0)
    assert status == 200 and 0.9 < took < 5  # held by the default, answered once back
    status, took = await _while_down(
        Settings(**base, router={"wait_ready_s": 0.3}), never.port, None
    )
    assert status == 503 and 0.25 < took < 2  # it never comes back: 503 in time
    status, took = await _while_down(Settings(**base, router={"wait_ready_s": 0}), never.port, 1.0)
    assert status == 503 and took < 0.5  # 0: at once
    full = Settings(**base, router={"wait_ready_max": 0})
    status, took = await _while_down(full, never.port, 1.0)
    assert status == 503 and took < 0.5  # no room to hold it: at once


async def test_every_replica_ejected_is_tried_anyway_panic() -> None:
    with FakeEngine(force="error-500") as a, FakeEngine(force="error-500") as b:
        settings = Settings(
            engines=[
                {"name": "a", "model": "m", "url": a.url},
                {"name": "b", "model": "m", "url": b.url},
            ],
            timeouts={"health_interval": 0.1},
            router={"breaker": {"failures": 1, "cooldown": 600}, "affinity": False},
        )
        async with in_process_gateway(settings) as client:
            failed = await client.post("/v1/chat/completions", json=_chat())
            registry = client.app.state.registry
            assert failed.status_code == 500  # the engines' own error, after a retry
            assert {ep.breaker.state for ep in registry.endpoints} == {"open"}
            a.app.state.force = b.app.state.force = "ok"  # they recover; breakers still open
            results = [await client.post("/v1/chat/completions", json=_chat()) for _ in range(4)]
        # Without panic routing these would be 503s for the 600 s cooldown.
        assert [r.status_code for r in results] == [200] * 4
        assert results[0].headers["x-tiergate-reason"] == "explicit+panic"
        # its success closed that replica's breaker: the rest route normally to it
        assert {r.headers["x-tiergate-reason"] for r in results[1:]} == {"explicit+load"}
        assert len(a.app.state.seen) + len(b.app.state.seen) == 2 + 4


async def test_an_answer_the_engine_aborted_is_retried_on_another_replica() -> None:
    """vLLM answers a request it aborted while stopping (a restart past its drain time)
    with 200 and finish_reason "abort": nothing has reached the client, so it is retried;
    with no replica left, an error says so."""
    with FakeEngine(force="abort") as stopping, FakeEngine(force="ok") as healthy:
        replicas = {"stopping": stopping, "healthy": healthy}
        engines = [{"name": n, "model": "m", "url": e.url} for n, e in replicas.items()]
        # no affinity: the two take turns first
        settings = Settings(engines=engines, router={"affinity": False})
        async with in_process_gateway(settings) as client:
            replies = [await client.post("/v1/chat/completions", json=_chat()) for _ in range(4)]
            metrics = (await client.get("/metrics")).text
        assert [r.status_code for r in replies] == [200] * 4
        assert {r.headers["x-tiergate-replica"] for r in replies} == {"healthy"}
        assert {r.json()["choices"][0]["finish_reason"] for r in replies} == {"stop"}
        tried = len(stopping.app.state.seen)
        assert tried >= 1 and len(healthy.app.state.seen) == 4
        assert f'reason="engine_aborted",replica="healthy",tier="m"}} {tried}.0' in metrics
        alone = Settings(engines=engines[:1])
        async with in_process_gateway(alone) as client:
            r = await client.post("/v1/chat/completions", json=_chat())
        assert r.status_code == 502, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "engine_aborted" and "restarting" in error["message"]
