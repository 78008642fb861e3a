"""Tenancy against the real vLLM engine: a tenant limited to the small tier gets 403 on
the large one, `auto` never picks it, and the usage ledger equals the engine's own
`usage` sums. Both tiers front the session's real engine (so no second engine starts);
the gateway under test runs in-process with tenancy on."""

from __future__ import annotations

import json

import pytest

from serving.config import Settings
from serving.tenants.store import Tenant, TenantStore
from tests.fake_engine import in_process_gateway
from tests.test_tenants import _tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_tenant_tiers_and_usage_against_the_real_engine(gateway, model, tmp_path) -> None:
    engine_url = gateway.engine("smollm2-cpu")["url"]
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("team-a", ("small",)))
        key = store.create_key("team-a", "ci")
    tok = _tokenizer()
    settings = Settings(
        engines=[{"name": "real", "model": model, "url": engine_url}],
        tiers=[
            {"name": "small", "model": "small-m", "engines": ["real"], "tokenizer": tok},
            {"name": "large", "model": "large-m", "engines": ["real"], "tokenizer": tok},
        ],
        router={"rules": {"default_tier": "large"}},
        tenancy={"enabled": True, "db": str(db)},
    )
    mine = {"authorization": f"Bearer {key}"}
    prompt = [{"role": "user", "content": "Name a colour."}]
    expected = {"prompt_tokens": 0, "completion_tokens": 0}
    async with in_process_gateway(settings) as client:
        r = await client.post(
            "/v1/chat/completions", json={"model": "large-m", "messages": prompt}, headers=mine
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        for stream in (False, True, False):
            body = {"model": "auto", "messages": prompt, "max_tokens": 8, "stream": stream}
            if stream:
                body["stream_options"] = {"include_usage": True}
            r = await client.post("/v1/chat/completions", json=body, headers=mine, timeout=120)
            assert r.status_code == 200, r.text
            assert r.headers["x-tiergate-tier"] == "small"  # never large, though the default
            if stream:
                events = [
                    json.loads(line[6:])
                    for line in r.text.splitlines()
                    if line.startswith("data: {")
                ]
                usage = events[-1]["usage"]
                assert r.text.rstrip().endswith("data: [DONE]")
            else:
                usage = r.json()["usage"]
            for k in expected:
                expected[k] += usage[k]
    with TenantStore(db) as store:
        rows = store.usage()
    assert [(r["tenant"], r["key"], r["tier"]) for r in rows] == [("team-a", "ci", "small")]
    assert rows[0]["requests"] == 3
    assert rows[0]["prompt_tokens"] == expected["prompt_tokens"] > 0
    assert rows[0]["completion_tokens"] == expected["completion_tokens"] > 0


async def test_tpm_and_budget_refusals_against_the_real_engine(gateway, model, tmp_path) -> None:
    """tpm is charged the engine's real usage (prompt + completion) after each answer;
    once the bucket is short, 429 with Retry-After and the -tokens headers. A spent hard
    budget is 429 insufficient_quota."""
    engine_url = gateway.engine("smollm2-cpu")["url"]
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("meter", (), tpm=100))
        store.set_tenant(Tenant("thrifty", (), budget_tokens=30, budget_period="day"))
        store.set_tenant(Tenant("paced", (), rpm=2))
        meter, thrifty = store.create_key("meter", "k"), store.create_key("thrifty", "k")
        paced = store.create_key("paced", "k")
    settings = Settings(
        engines=[{"name": "real", "model": model, "url": engine_url}],
        tenancy={"enabled": True, "db": str(db)},
    )
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8}
    async with in_process_gateway(settings) as client:

        async def post(key: str):
            return await client.post(
                "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}
            )

        answers = [await post(meter) for _ in range(16)]
        codes = [r.status_code for r in answers]
        assert codes[0] == 200 and 429 in codes, codes
        first_refusal = answers[codes.index(429)]
        used = sum(r.json()["usage"]["total_tokens"] for r in answers if r.status_code == 200)
        assert 100 - used < 8 + 20  # refused only once the real usage had spent the bucket
        assert first_refusal.json()["error"]["code"] == "rate_limit_exceeded"
        assert "100 tokens per minute" in first_refusal.json()["error"]["message"]
        assert int(first_refusal.headers["retry-after"]) >= 1
        assert first_refusal.headers["x-ratelimit-limit-tokens"] == "100"
        ok = answers[0].headers
        assert ok["x-ratelimit-limit-tokens"] == "100"
        assert ok["x-ratelimit-remaining-tokens"] == "92"  # 8 reserved at admission

        paced_answers = [await post(paced) for _ in range(3)]
        assert [r.status_code for r in paced_answers] == [200, 200, 429]
        assert paced_answers[1].headers["x-ratelimit-remaining-requests"] == "0"
        refused = paced_answers[2]
        assert 20 <= int(refused.headers["retry-after"]) <= 30  # a request refills in 30 s
        assert refused.headers["x-ratelimit-limit-requests"] == "2"
        assert refused.json()["error"]["type"] == "rate_limit_error"

        budget = [await post(thrifty) for _ in range(6)]
        codes = [r.status_code for r in budget]
        stop = codes.index(429)  # ~14 tokens a request against 30: the third or fourth
        assert stop >= 2 and codes[:stop] == [200] * stop and codes[stop:] == [429] * (6 - stop)
        spent = sum(r.json()["usage"]["total_tokens"] for r in budget[:stop])
        assert spent >= 30 > spent - budget[stop - 1].json()["usage"]["total_tokens"]
        err = budget[-1].json()["error"]
        assert err["type"] == "insufficient_quota" and err["code"] == "insufficient_quota"
