"""Tenant limits in a real Redis (Debian's redis-server, started here): the same answers
as the in-process limiter, and two gateway processes in front of the real engine share
one tenant's rpm."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
import yaml

from serving.tenants.limits import RateLimited
from serving.tenants.store import Principal, Scope, Tenant, TenantStore
from tests.utils import GatewayProcess, free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_redis_limiter_answers_as_the_in_process_one(redis_url) -> None:
    from serving.tenants.redis_limits import RedisLimiter

    lim = RedisLimiter(redis_url, prefix=f"test:{time.time()}:")
    try:
        p = Principal("t", "k", None, (Scope("t:t", rpm=3, tpm=1000, max_concurrency=2),))
        a = await lim.admit(p, 100, now=1000.0)
        assert a.headers["x-ratelimit-remaining-requests"] == "2"
        assert a.headers["x-ratelimit-remaining-tokens"] == "900"
        assert a.headers["x-ratelimit-reset-requests"] == "20s"
        b = await lim.admit(p, 100, now=1000.0)
        with pytest.raises(RateLimited, match="2 requests in flight") as exc:
            await lim.admit(p, 100, now=1000.0)
        assert exc.value.headers["retry-after"] == "1"
        assert exc.value.headers["x-ratelimit-limit-tokens"] == "1000"
        a.release(1000.0, {"prompt_tokens": 10, "completion_tokens": 20})
        await asyncio.gather(*lim.pending)
        c = await lim.admit(p, 100, now=1000.0)
        assert c.headers["x-ratelimit-remaining-tokens"] == "770"
        b.release(1000.0)
        await asyncio.gather(*lim.pending)
        with pytest.raises(RateLimited, match="3 requests per minute") as exc:
            await lim.admit(p, 100, now=1000.0)
        assert exc.value.headers["retry-after"] == "20"
        assert await lim.admit(p, 100, now=1020.0) is not None
        with pytest.raises(RateLimited, match="may use in a minute"):
            await lim.admit(p, 5000, now=1020.0)
    finally:
        await lim.close()


async def test_a_dead_gateways_requests_stop_counting_after_its_lease(redis_url) -> None:
    """Two gateway processes share a tenant of 2 in flight. One dies holding both slots
    (its renewals stop, nothing is released): the other is refused until one lease
    after the dead one's last word, then admitted. A live process's requests that
    outlast several leases keep counting, and its release frees them at once."""
    from serving.tenants.redis_limits import RedisLimiter

    prefix = f"test:{time.time()}:"
    lease = 3.0  # the shortest the config allows; renewals every second
    live, dead, other = (RedisLimiter(redis_url, prefix=prefix, lease=lease) for _ in range(3))
    p = Principal("t", "k", None, (Scope("t:t", max_concurrency=2),))
    try:
        held = [await live.admit(p, 10, now=time.time()) for _ in range(2)]
        await asyncio.sleep(1.5 * lease)  # past one lease: counted only if renewed
        with pytest.raises(RateLimited, match="2 requests in flight"):
            await other.admit(p, 10, now=time.time())
        for a in held:
            a.release(time.time())
        await asyncio.gather(*live.pending)
        assert await live.redis.hgetall(prefix + "t:t") == {}  # its fields went with them
        assert not live.held  # nothing held: nothing to renew

        gone = [await dead.admit(p, 10, now=time.time()) for _ in range(2)]
        assert all(gone) and dead.beat is not None
        dead.beat.cancel()  # it dies: no renewal, no release, ever
        t0 = time.time()
        with pytest.raises(RateLimited, match="2 requests in flight"):
            await other.admit(p, 10, now=time.time())
        while True:
            try:
                back = await other.admit(p, 10, now=time.time())
                break
            except RateLimited:
                assert time.time() - t0 < lease + 1, "the dead process's slots never came back"
                await asyncio.sleep(0.1)
        assert time.time() - t0 >= lease - 1  # not before its lease ran out
        fields = await other.redis.hgetall(prefix + "t:t")
        assert f"f:{dead.me}".encode() not in fields  # its count is gone from the hash
        assert fields[f"f:{other.me}".encode()] == b"1"
        back.release(time.time())
        await asyncio.gather(*other.pending)
    finally:
        for lim in (live, dead, other):
            await lim.close()


async def test_a_release_that_never_reached_redis_is_mended_by_the_next_renewal(
    redis_url,
) -> None:
    from serving.tenants.redis_limits import RedisLimiter

    prefix = f"test:{time.time()}:"
    gw, other = (RedisLimiter(redis_url, prefix=prefix, lease=3.0) for _ in range(2))
    p = Principal("t", "k", None, (Scope("t:t", max_concurrency=2),))
    try:
        kept = await gw.admit(p, 10, now=time.time())
        lost = await gw.admit(p, 10, now=time.time())
        lost.released = True  # its release script failed: Redis still counts it
        gw.let_go(p)
        with pytest.raises(RateLimited, match="2 requests in flight"):
            await other.admit(p, 10, now=time.time())
        await asyncio.sleep(gw.lease / 3 + 0.5)  # one renewal, with the count gw holds: 1
        third = await other.admit(p, 10, now=time.time())
        for a in (kept, third):
            a.release(time.time())
        await asyncio.gather(*gw.pending, *other.pending)
        assert await gw.redis.hgetall(prefix + "t:t") == {}  # nothing left counting
    finally:
        for lim in (gw, other):
            await lim.close()


async def test_two_gateways_on_one_redis_share_a_tenants_rpm(
    redis_url, gateway, model, tmp_path
) -> None:
    """Both gateways front the session's real engine; one tenant at 30 rpm sends 80
    requests alternately through them. Together they admit 30 plus what refilled while
    the test ran, as one gateway would."""
    engine_url = gateway.engine("smollm2-cpu")["url"]
    db = tmp_path / "tenants.sqlite3"
    rpm = 30
    with TenantStore(db) as store:
        store.set_tenant(Tenant("team-a", (), rpm=rpm))
        key = store.create_key("team-a", "ci")
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "engines": [{"name": "real", "model": model, "url": engine_url}],
                "tenancy": {"enabled": True, "db": str(db), "redis_url": redis_url},
            }
        )
    )
    with (
        GatewayProcess(config, tmp_path / "a.log") as a,
        GatewayProcess(config, tmp_path / "b.log") as b,
    ):
        a.wait_ready(60)
        b.wait_ready(60)
        statuses: dict[str, list[int]] = {a.url: [], b.url: []}
        body = {"model": model, "prompt": "Hi", "max_tokens": 1}
        headers = {"authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=60) as http:
            started = time.monotonic()

            async def one(i: int) -> None:
                url = (a.url, b.url)[i % 2]
                r = await http.post(url + "/v1/completions", json=body, headers=headers)
                assert r.status_code in (200, 429), r.text
                statuses[url].append(r.status_code)

            for batch in range(0, 80, 8):
                await asyncio.gather(*(one(i) for i in range(batch, batch + 8)))
            elapsed = time.monotonic() - started
        assert a.stop(signal.SIGINT) in (0, 130) and b.stop(signal.SIGINT) in (0, 130)
    ok = {url: s.count(200) for url, s in statuses.items()}
    refilled = elapsed * rpm / 60
    print(f"admitted per gateway {ok}, {elapsed:.1f} s, bucket refilled {refilled:.1f}")
    assert all(n > 0 for n in ok.values())  # both gateways served the tenant
    total = sum(ok.values())
    assert rpm <= total <= rpm + refilled + 1  # one bucket, not one per gateway (2 x 30)
    assert sum(s.count(429) for s in statuses.values()) == 80 - total


async def test_budget_spend_is_shared_through_redis(redis_url) -> None:
    """Two limiters (two replicas) add a tenant's tokens to one spend for the period."""
    from serving.tenants.redis_limits import RedisLimiter
    from serving.tenants.store import Budget

    prefix = f"test:{time.time()}:"
    one, two = RedisLimiter(redis_url, prefix=prefix), RedisLimiter(redis_url, prefix=prefix)
    try:
        p = Principal("t", "k", None, (), Budget(100, "month", True))
        for limiter, used in ((one, 30), (two, 50), (one, 5)):
            admission = await limiter.admit(p, 10, now=1000.0)
            admission.release(1000.0, {"prompt_tokens": used - 1, "completion_tokens": 1})
            await asyncio.gather(*limiter.pending)
        assert await one.budget_spent(p, 1000.0) == await two.budget_spent(p, 1000.0) == 85
        next_month = 1000.0 + 40 * 86400
        assert await one.budget_spent(p, next_month) == 0  # a new period starts at zero
    finally:
        await one.close()
        await two.close()


async def test_limits_fail_open_while_redis_is_unreachable(caplog) -> None:
    """Nothing listens on the port: admission serves (not counted) and says so once,
    and a budget reads as unspent, rather than every tenant getting a 500."""
    from serving.tenants.redis_limits import RedisLimiter
    from serving.tenants.store import Budget

    lim = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0")
    try:
        p = Principal("t", "k", None, (Scope("t:t", rpm=1),), Budget(10, "day", True))
        for _ in range(3):
            assert await lim.admit(p, 10, now=time.time()) is None
        assert await lim.budget_spent(p, time.time()) == 0
        warnings = [r for r in caplog.records if "Redis unreachable" in r.getMessage()]
        assert len(warnings) == 1
    finally:
        await lim.close()
