"""/v1/embeddings through the gateway, on FAKE engines (tests/fake_engine.py): what a
real one cannot be made to do on demand (fail), and tenancy without a second real
engine. The real engine's happy path: tests/test_embeddings_real.py."""

from __future__ import annotations

import base64
import struct

import pytest

from serving.config import Settings, load_settings
from serving.engines.defaults import task_problems
from serving.tenants.store import Tenant, TenantStore
from tests.fake_engine import FakeEngine, in_process_gateway
from tests.test_tenants import _tokenizer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(db, chat: str, embed: list[str], **router) -> Settings:
    engines = [{"name": "e-chat", "model": "m-chat", "url": chat}]
    engines += [{"name": f"e-embed-{i}", "model": "m-embed", "url": u} for i, u in enumerate(embed)]
    return Settings(
        engines=engines,
        tiers=[
            {"name": "chat", "model": "m-chat", "engines": ["e-chat"], "tokenizer": _tokenizer()},
            {"name": "embed", "model": "m-embed", "task": "embed",
             "engines": [e["name"] for e in engines[1:]], "cost": {"input_per_1k": 2.0}},
        ],
        router={"retry": {"min_retries": 100}, **router},
        tenancy={"enabled": True, "db": str(db)},
        server={"api_keys": ["admin-key"]},
        timeouts={"health_interval": 0.1},
    )  # fmt: skip


async def test_embeddings_route_retry_count_and_bill_input_tokens(tmp_path) -> None:
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("search", ("embed",)))
        key = store.create_key("search", "indexer")
        store.set_tenant(Tenant("chatty", ("chat",)))
        chatty = store.create_key("chatty", "bot")
    mine = {"authorization": f"Bearer {key}"}
    with (
        FakeEngine("ok") as chat,
        FakeEngine("error-500") as broken,
        FakeEngine("ok") as good,
    ):
        async with in_process_gateway(_settings(db, chat.url, [broken.url, good.url])) as client:
            # float and base64, a batch; every request lands on the good replica in the
            # end, those sent to the broken one first after one retry
            for i in range(6):
                encoding = "base64" if i % 2 else "float"
                body = {"model": "m-embed", "input": ["a", "bbb"], "encoding_format": encoding}
                r = await client.post("/v1/embeddings", json=body, headers=mine)
                assert r.status_code == 200, r.text
                assert r.headers["x-tiergate-replica"] == "e-embed-1"
                assert r.headers["x-tiergate-reason"].startswith("explicit+")
                data = r.json()["data"]
                assert [d["index"] for d in data] == [0, 1]
                first = data[1]["embedding"]
                if encoding == "base64":
                    first = list(struct.unpack("<4f", base64.b64decode(first)))
                assert first == [3.0, 1.0, 0.0, -1.0]  # passed through as the engine sent it
                assert r.json()["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
            assert len(broken.app.state.seen) >= 1 and len(good.app.state.seen) == 6
            # auto: the one embedding tier the tenant may use
            r = await client.post(
                "/v1/embeddings", json={"model": "auto", "input": "x"}, headers=mine
            )
            assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "embed"
            assert r.headers["x-tiergate-reason"].startswith("embedding+")
            ok = 7
            # refused before any engine: the wrong kind of model, bad input, no key, a tier
            # the tenant may not use
            refusals = [
                ("/v1/embeddings", {"model": "m-chat", "input": "x"}, 400, "model_not_supported"),
                ("/v1/chat/completions", {"model": "m-embed", "messages": [{"role": "user",
                 "content": "hi"}]}, 400, "model_not_supported"),
                ("/v1/embeddings", {"model": "m-embed", "input": []}, 400, "invalid_value"),
                ("/v1/embeddings", {"model": "m-embed", "input": [""]}, 400, "invalid_value"),
                ("/v1/embeddings", {"model": "m-embed", "input": 5}, 400, "invalid_type"),
                ("/v1/embeddings", {"model": "m-embed"}, 400, None),
                ("/v1/embeddings", {"model": "m-embed", "input": "x", "stream": True}, 400,
                 "invalid_value"),
                ("/v1/embeddings", {"model": "m-embed", "input": "x", "encoding_format": "hex"},
                 400, None),
                ("/v1/embeddings", {"model": "m-nope", "input": "x"}, 404, "model_not_found"),
                ("/v1/rerank", {"model": "m-embed", "query": "q", "documents": []}, 400, None),
            ]  # fmt: skip
            seen = len(good.app.state.seen) + len(broken.app.state.seen)
            for path, body, status, code in refusals:
                r = await client.post(
                    path, json=body, headers={"authorization": "Bearer admin-key"}
                )
                assert r.status_code == status, (body, r.text)
                err = r.json()["error"]
                assert set(err) == {"message", "type", "param", "code"}
                assert err["type"] == "invalid_request_error" and err["param"] in (
                    "model",
                    "input",
                    "stream",
                    "encoding_format",
                    "documents",
                )
                if code:
                    assert err["code"] == code, err
            assert len(good.app.state.seen) + len(broken.app.state.seen) == seen
            r = await client.post("/v1/embeddings", json={"model": "m-embed", "input": "x"})
            assert r.status_code == 401
            theirs = {"authorization": f"Bearer {chatty}"}
            for model in ("auto", "m-embed"):  # a tenant without the embedding tier
                body = {"model": model, "input": "x"}
                r = await client.post("/v1/embeddings", json=body, headers=theirs)
                assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "m-chat", "messages": [{"role": "user", "content": "hi"}]},
                headers=mine,
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
            # chats with auto never land on the embedding tier
            for _ in range(3):
                body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}
                r = await client.post(
                    "/v1/chat/completions", json=body, headers={"authorization": "Bearer admin-key"}
                )
                assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "chat"
            metrics = (await client.get("/metrics")).text
            requests = 'tiergate_requests_total{endpoint="/v1/embeddings",'
            assert requests + 'model="m-embed",status="200"} 6.0' in metrics
            assert requests + 'model="auto",status="200"} 1.0' in metrics
            assert 'tiergate_prompt_tokens_total{model="m-embed"} 36.0' in metrics
            # the tenant pays for its input tokens, at the tier's input price
            tokens = 'tiergate_tenant_tokens_total{key="indexer",kind="prompt",tenant="search",'
            assert tokens + 'tier="embed"} 39.0' in metrics
        with TenantStore(db) as store:  # flushed at shutdown
            rows = {(r["key"], r["tier"]): r for r in store.usage()}
    row = rows[("indexer", "embed")]
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (ok, 39, 0)
    assert row["cost_usd"] == pytest.approx(39 * 2.0 / 1000)
    assert len(chat.app.state.seen) == 3  # the admin's three chats, nothing else


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_an_embedding_tier_named_by_auto_rules_fails_at_start(tmp_path, anyio_backend) -> None:
    settings = _settings(tmp_path / "t.db", "http://x:1", ["http://x:2"])
    assert task_problems(settings) == []
    bad = _settings(
        tmp_path / "t.db", "http://x:1", ["http://x:2"], rules={"default_tier": "embed"}
    )
    assert task_problems(bad) == [
        "router.rules.default_tier: tier 'embed' serves embeddings, not chats"
    ]
    # a supervised engine whose manifest embeds, in a tier said to generate
    data = {
        "engines": [{"name": "mini", "model": "all-minilm-l6-v2"}],
        "tiers": [{"name": "t", "model": "mini", "engines": ["mini"], "task": "generate"}],
    }
    assert task_problems(Settings(**data)) == [
        "tiers.0.task: tier 't' serves generate, but engines.0 (mini) serves embed"
    ]
    # without tiers, the default config's: one tier per model, each with its manifest's task
    assert task_problems(load_settings()) == []
