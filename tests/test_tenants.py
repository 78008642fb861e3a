"""Tenants and named keys: stored hashed, refused at once when revoked, limited to their
tiers (403 elsewhere, and `auto` picks only among theirs), usage in the ledger.

The gateway tests run the real app in-process with FAKE engines; the real engine's
happy path is in tests/test_tenants_real.py."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys

import pytest

from serving.config import Settings
from serving.errors import Unauthorized
from serving.tenants import keys
from serving.tenants.auth import CONFIG, OPEN, Authenticator
from serving.tenants.store import Tenant, TenantStore
from tests.fake_engine import FakeEngine, in_process_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def store(tmp_path) -> TenantStore:
    s = TenantStore(tmp_path / "tenants.sqlite3")
    yield s
    s.close()


def test_keys_are_random_well_formed_and_never_stored_in_clear(store: TenantStore) -> None:
    store.set_tenant(Tenant("team-a", ("small",)))
    key = store.create_key("team-a", "ci")
    other = store.create_key("team-a", "laptop")
    assert key != other and keys.key_id(key) and keys.key_id(other)
    assert keys.shown(key).endswith("…") and key[-10:] not in keys.shown(key)
    dump = "\n".join(store.db.iterdump())
    assert key not in dump and key[12:] not in dump  # only the digest is kept
    assert keys.matches(key, keys.digest(key)) and not keys.matches(other, keys.digest(key))


def test_bearer_parsing_refuses_every_odd_shape() -> None:
    assert keys.bearer("Bearer abc") == "abc"
    assert keys.bearer("bearer abc") == "abc"  # the scheme is case-insensitive (RFC 7235)
    for bad in ("", "abc", "Basic abc", "Bearer", "Bearer ", "Bearer abc ", "Bearer a b"):
        assert keys.bearer(bad) is None, bad


def test_lookup_revoke_and_narrowing(store: TenantStore) -> None:
    store.set_tenant(Tenant("team-a", ("small",), rpm=100, tpm=1000, max_concurrency=4))
    key = store.create_key("team-a", "ci", rpm=10, max_concurrency=8)
    who = store.lookup(key)
    assert (who.tenant, who.key, who.tiers) == ("team-a", "ci", frozenset({"small"}))
    assert [who.tightest(x) for x in ("rpm", "tpm", "max_concurrency")] == [10, 1000, 4]
    assert [s.id for s in who.scopes] == ["t:team-a", "k:team-a/ci"]  # both count
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # wrong secret
    assert store.lookup("tg-00000000-" + "x" * 43) is None  # unknown id
    store.revoke("team-a", "ci")
    assert store.lookup(key) is None  # refused from the next lookup on
    with pytest.raises(ValueError, match="no live key"):
        store.revoke("team-a", "ci")
    with pytest.raises(ValueError, match="no tenant named 'nope'"):
        store.create_key("nope", "x")
    store.create_key("team-a", "other")
    with pytest.raises(ValueError, match="already has a key named 'other'"):
        store.create_key("team-a", "other")
    with pytest.raises(ValueError, match="reserved"):
        store.set_tenant(Tenant("default", ()))
    store.set_tenant(Tenant("team-a", ()))  # widened to every tier, in place
    assert store.lookup(store.create_key("team-a", "wide")).tiers is None


def test_authenticator_modes(store: TenantStore) -> None:
    assert Authenticator([])("") is OPEN  # no keys anywhere: open, as before
    auth = Authenticator(["cfg-key"], store)
    assert auth("Bearer cfg-key") is CONFIG
    store.set_tenant(Tenant("t", ("small",)))
    key = store.create_key("t", "k")
    assert auth(f"Bearer {key}").tenant == "t"
    for header in ("", key, f"Basic {key}", f"Bearer {key} ", "Bearer cfg-key2"):
        with pytest.raises(Unauthorized):
            auth(header)


def test_usage_ledger_adds_up(store: TenantStore) -> None:
    from serving.tenants.usage import UsageLedger

    ledger = UsageLedger(store)
    for _ in range(3):
        ledger.add("t", "k", "small", {"prompt_tokens": 10, "completion_tokens": 5}, 0.5)
    ledger.add("t", "k", "large", None, 0.0)
    ledger.flush()
    ledger.add("t", "k", "small", {"prompt_tokens": 1, "completion_tokens": 1}, 0.25)
    ledger.flush()
    rows = {r["tier"]: r for r in store.usage()}
    assert rows["small"]["requests"] == 4 and rows["small"]["prompt_tokens"] == 31
    assert rows["small"]["completion_tokens"] == 16 and rows["small"]["cost_usd"] == 1.75
    assert rows["large"]["requests"] == 1 and rows["large"]["prompt_tokens"] == 0


def _tokenizer() -> str:
    from models.manifest import load_manifest
    from models.prepare import prepare

    cache = Settings.model_fields["model_cache"].default_factory()
    return str(prepare(load_manifest("smollm2-135m-instruct"), cache))


def _two_tiers(db, small: str, large: str, **server) -> Settings:
    tok = _tokenizer()
    return Settings(
        engines=[
            {"name": "e-small", "model": "m-small", "url": small},
            {"name": "e-large", "model": "m-large", "url": large},
        ],
        tiers=[
            {"name": "small", "model": "m-small", "engines": ["e-small"], "tokenizer": tok,
             "cost": {"input_per_1k": 1.0, "output_per_1k": 2.0}},
            {"name": "large", "model": "m-large", "engines": ["e-large"], "tokenizer": tok},
        ],
        router={"rules": {"default_tier": "large"}},
        server=server,
        tenancy={"enabled": True, "db": str(db)},
        timeouts={"health_interval": 0.1},
    )  # fmt: skip


async def test_a_tenant_keeps_to_its_tiers_through_the_gateway(tmp_path) -> None:
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("team-a", ("small",)))
        key = store.create_key("team-a", "ci")
    with FakeEngine("ok") as small, FakeEngine("ok") as large:
        settings = _two_tiers(db, small.url, large.url, api_keys=["admin-key"])
        async with in_process_gateway(settings) as client:
            mine = {"authorization": f"Bearer {key}"}
            admin = {"authorization": "Bearer admin-key"}

            def chat(model: str, **extra) -> dict:
                return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}

            r = await client.post("/v1/chat/completions", json=chat("m-large"), headers=mine)
            assert r.status_code == 403, r.text
            err = r.json()["error"]
            assert err["code"] == "model_not_allowed" and err["param"] == "model"
            assert set(err) == {"message", "type", "param", "code"} and "team-a" in err["message"]
            # auto: the rules' default is large, but this tenant only has small
            for _ in range(5):
                r = await client.post("/v1/chat/completions", json=chat("auto"), headers=mine)
                assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "small"
            hinted = chat("auto", metadata={"tier": "large"})
            r = await client.post("/v1/chat/completions", json=hinted, headers=mine)
            assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
            r = await client.post("/v1/chat/completions", json=chat("m-small"), headers=mine)
            assert r.status_code == 200
            ok_small = 6
            # the operator's config key still reaches every tier
            r = await client.post("/v1/chat/completions", json=chat("auto"), headers=admin)
            assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "large"
            models = (await client.get("/v1/models", headers=mine)).json()["data"]
            assert [m["id"] for m in models] == ["m-small", "auto"]
            everyone = (await client.get("/v1/models", headers=admin)).json()["data"]
            assert [m["id"] for m in everyone] == ["m-small", "m-large", "auto"]
            # the operator routes are the operator's
            r = await client.get("/tiergate/engines", headers=mine)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
            assert (await client.get("/tiergate/engines", headers=admin)).status_code == 200
            # revoked: refused on the very next request
            with TenantStore(db) as store:
                store.revoke("team-a", "ci")
            r = await client.post("/v1/chat/completions", json=chat("m-small"), headers=mine)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert (await client.get("/v1/models", headers=mine)).status_code == 401
            assert len(large.app.state.seen) == 1  # only the admin's request
            metrics = (await client.get("/metrics")).text
            assert (
                'tiergate_tenant_requests_total{key="ci",tenant="team-a",tier="small"} 6.0'
                in metrics
            )
            assert (
                'tiergate_tenant_refused_total{reason="model_not_allowed",tenant="team-a"} 2.0'
                in metrics
            )
            # the FAKE engine's usage (3 prompt, 1 completion) at the small tier's prices
            tokens = 'tiergate_tenant_tokens_total{key="ci",kind="prompt",tenant="team-a",'
            assert tokens + 'tier="small"} 18.0' in metrics
            assert 'tiergate_tenant_estimated_cost_total{tenant="team-a",tier="small"}' in metrics
        with TenantStore(db) as store:  # flushed at shutdown
            rows = {(r["key"], r["tier"]): r for r in store.usage()}
    assert rows[("ci", "small")]["requests"] == ok_small
    assert rows[("config", "large")]["requests"] == 1
    assert len(small.app.state.seen) == ok_small


def test_keys_cli(tmp_path) -> None:
    db = str(tmp_path / "t.sqlite3")

    def keys_cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        run = subprocess.run(
            [sys.executable, "-m", "serving.cli", "keys", "--db", db, *args],
            capture_output=True,
            text=True,
        )
        assert (run.returncode == 0) == ok, run.stderr
        return run

    keys_cli("tenant", "team-a", "--tiers", "small", "--rpm", "60")
    key = keys_cli("create", "team-a", "ci").stdout.strip()
    assert keys.key_id(key)
    listed = keys_cli("list").stdout
    assert "team-a" in listed and "ci" in listed and "live" in listed
    assert key not in listed and key[12:] not in listed  # the secret never again
    keys_cli("revoke", "team-a", "ci")
    assert "revoked" in keys_cli("list").stdout
    bad = keys_cli("create", "nobody", "x", ok=False)
    assert bad.returncode == 2 and "no tenant named 'nobody'" in bad.stderr
    assert json.loads(keys_cli("usage", "--json").stdout) == []
    rows = sqlite3.connect(db).execute("SELECT count(*) FROM keys").fetchone()
    assert rows == (1,)


def test_limits_buckets_headers_and_release() -> None:
    from serving.tenants.limits import RateLimited, TenantLimiter, duration
    from serving.tenants.store import Principal, Scope

    assert [duration(x) for x in (0.25, 1, 59.2, 360)] == ["250ms", "1s", "1m0s", "6m0s"]
    lim = TenantLimiter()
    p = Principal("t", "k", None, (Scope("t:t", rpm=3, tpm=1000, max_concurrency=2),))
    a = lim.admit_now(p, 100, now=0.0)
    assert a.headers["x-ratelimit-limit-requests"] == "3"
    assert a.headers["x-ratelimit-remaining-requests"] == "2"
    assert a.headers["x-ratelimit-remaining-tokens"] == "900"
    assert a.headers["x-ratelimit-reset-requests"] == "20s"  # one request refills in 20 s
    b = lim.admit_now(p, 100, now=0.0)
    with pytest.raises(RateLimited, match="2 requests in flight") as exc:
        lim.admit_now(p, 100, now=0.0)
    assert exc.value.status == 429 and exc.value.headers["retry-after"] == "1"
    a.release(0.0, {"prompt_tokens": 10, "completion_tokens": 20})  # trued up: 70 back
    a.release(0.0, {"total_tokens": 999})  # twice is once
    assert lim.admit_now(p, 100, now=0.0).headers["x-ratelimit-remaining-tokens"] == "770"
    with pytest.raises(RateLimited, match="3 requests per minute") as exc:
        b.release(0.0)  # no usage: the reservation stands
        lim.admit_now(p, 100, now=0.0)
    assert exc.value.headers["retry-after"] == "20"
    assert lim.admit_now(p, 100, now=20.0) is not None  # a minute's allowance, spread out
    with pytest.raises(RateLimited, match="more than 't' may use in a minute"):
        lim.admit_now(p, 5000, now=20.0)
    assert lim.admit_now(Principal("t", "k", None), 10, 0.0) is None  # no limits, no state


def test_a_key_counts_against_its_tenant_too() -> None:
    from serving.tenants.limits import RateLimited, TenantLimiter
    from serving.tenants.store import Principal, Scope

    lim = TenantLimiter()
    tenant = Scope("t:t", rpm=3)
    a = Principal("t", "a", None, (tenant,))
    b = Principal("t", "b", None, (tenant, Scope("k:t/b", rpm=1)))
    lim.admit_now(b, 1, 0.0)
    with pytest.raises(RateLimited, match="key 't/b'"):
        lim.admit_now(b, 1, 0.0)  # the key's own narrower limit
    lim.admit_now(a, 1, 0.0)
    lim.admit_now(a, 1, 0.0)
    with pytest.raises(RateLimited, match="tenant 't'"):
        lim.admit_now(a, 1, 0.0)  # the tenant's limit counts both keys


async def test_rpm_and_concurrency_through_the_gateway_on_every_path(tmp_path) -> None:
    """429 with Retry-After and the x-ratelimit-* headers; an in-flight slot is held until
    the stream ends and given back when it is done, cut by the client, or failed."""
    import aiohttp

    from tests.test_load_accounting_fake import served

    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("busy", (), rpm=600, max_concurrency=1))
        store.set_tenant(Tenant("slow", (), rpm=2))
        busy, slow = store.create_key("busy", "k"), store.create_key("slow", "k")
    with FakeEngine("trickle") as long, FakeEngine("error-500") as broken:
        settings = _two_tiers(db, long.url, broken.url)
        async with served(settings) as (_, url), aiohttp.ClientSession() as http:

            async def post(key: str, model: str = "m-small", stream: bool = True):
                body = {"model": model, "stream": stream}
                body["messages"] = [{"role": "user", "content": "hi"}]
                return await http.post(
                    url + "/v1/chat/completions",
                    json=body,
                    headers={"authorization": f"Bearer {key}"},
                )

            # rpm: two, then 429 with the headers and a Retry-After of the refill time
            for _ in range(2):
                r = await post(slow, stream=False)
                assert r.status == 200 and r.headers["x-ratelimit-limit-requests"] == "2"
            r = await post(slow, stream=False)
            body = await r.json()
            assert r.status == 429 and body["error"]["type"] == "rate_limit_error"
            assert body["error"]["code"] == "rate_limit_exceeded"
            assert 25 <= int(r.headers["retry-after"]) <= 30  # a request refills in 60/2 s
            assert r.headers["x-ratelimit-remaining-requests"] == "0"
            reset = r.headers["x-ratelimit-reset-requests"]  # full again in about a minute
            assert reset == "1m0s" or (reset.endswith("s") and 50 <= int(reset[:-1]) <= 59)

            async def refused() -> bool:
                r = await post(busy, stream=False)
                await r.read()
                return r.status == 429

            async def slot_back() -> None:
                for _ in range(100):
                    if not await refused():
                        return
                    await asyncio.sleep(0.05)
                raise AssertionError("the in-flight slot never came back")

            # held while a stream runs; back when the client cuts it
            stream = await post(busy)
            assert stream.status == 200
            await stream.content.readline()
            assert await refused()  # the one slot is taken until the stream ends
            stream.close()  # the client goes away mid-stream
            await slot_back()
            # back after an engine error too
            r = await post(busy, model="m-large", stream=False)
            assert r.status >= 500 and (await r.json())["error"]
            assert not await refused()


async def test_a_spent_budget_gives_insufficient_quota(tmp_path) -> None:
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("thrifty", (), budget_tokens=10, budget_period="day"))
        store.set_tenant(Tenant("lenient", (), budget_tokens=10, budget_hard=False))
        thrifty, lenient = store.create_key("thrifty", "k"), store.create_key("lenient", "k")
    with FakeEngine("ok") as small, FakeEngine("ok") as large:
        async with in_process_gateway(_two_tiers(db, small.url, large.url)) as client:
            body = {"model": "m-small", "messages": [{"role": "user", "content": "hi"}]}

            async def status(key: str) -> tuple[int, dict]:
                r = await client.post(
                    "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
                )
                return r.status_code, r.json()

            # the FAKE engine reports 4 tokens a request: 0, 4, 8 spent, then 12 >= 10
            assert [(await status(thrifty))[0] for _ in range(3)] == [200, 200, 200]
            code, answer = await status(thrifty)
            assert code == 429 and answer["error"]["type"] == "insufficient_quota"
            assert answer["error"]["code"] == "insufficient_quota"
            assert "10-token budget for this day" in answer["error"]["message"]
            assert [(await status(lenient))[0] for _ in range(5)] == [200] * 5  # soft
    with TenantStore(db) as store:
        assert store.spent("thrifty", "2000-01-01") == 12  # the refused one cost nothing
        assert store.spent("lenient", "2000-01-01") == 20
