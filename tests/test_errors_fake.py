"""Engine failures the real vLLM cannot produce on demand, against a FAKE engine.

The gateway runs in-process with its real upstream client and timeouts; the fake
engine is a real HTTP server on loopback (tests/fake_engine.py).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.config import Settings
from tests.fake_engine import BEHAVIOURS, GONE_URL, FakeEngine, in_process_gateway

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def fake():
    with FakeEngine() as engine:
        yield engine


@pytest.fixture
async def gw(fake: FakeEngine):
    engines = [{"name": f"fake-{m}", "model": m, "url": fake.url} for m in BEHAVIOURS]
    engines.append({"name": "gone", "model": "gone", "url": GONE_URL})
    settings = Settings(engines=engines, timeouts={"read": 0.5, "health_interval": 0.1})
    async with in_process_gateway(settings) as client:
        yield client


def _chat(model: str, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    return err


def _events(r: httpx.Response) -> list[str]:
    return [e.removeprefix("data: ") for e in r.text.split("\n\n") if e.startswith("data: ")]


async def test_fake_ok_passes(gw: httpx.AsyncClient) -> None:
    r = await gw.post("/v1/chat/completions", json=_chat("ok"))
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
async def test_stalled_engine_is_504(gw: httpx.AsyncClient, stream: bool) -> None:
    r = await gw.post("/v1/chat/completions", json=_chat("stall", stream))
    err = _error(r, 504, "upstream_timeout")
    assert err["type"] == "timeout_error"


async def test_engine_stalling_mid_body_is_504(gw: httpx.AsyncClient) -> None:
    r = await gw.post("/v1/chat/completions", json=_chat("stall-body"))
    _error(r, 504, "upstream_timeout")


async def test_engine_500_is_wrapped(gw: httpx.AsyncClient) -> None:
    err = _error(await gw.post("/v1/chat/completions", json=_chat("error-500")), 500, None)
    assert err["message"] == "engine exploded"
    assert err["type"] == "upstream_error"


async def test_engine_garbage_is_wrapped(gw: httpx.AsyncClient) -> None:
    err = _error(await gw.post("/v1/chat/completions", json=_chat("garbage")), 502, None)
    assert "proxy error" in err["message"]


async def test_no_engine_ready_is_503(gw: httpx.AsyncClient) -> None:
    err = _error(await gw.post("/v1/chat/completions", json=_chat("gone")), 503, "no_engine_ready")
    assert "gone" in err["message"]
    models = (await gw.get("/v1/models")).json()["data"]
    assert {m["id"]: m["ready"] for m in models}["gone"] is False


async def test_ready_is_503_when_nothing_is_ready(fake: FakeEngine) -> None:
    settings = Settings(engines=[{"name": "gone", "model": "gone", "url": GONE_URL}])
    async with in_process_gateway(settings) as client:
        await asyncio.sleep(0.2)  # a few failed health probes
        _error(await client.get("/ready"), 503, "no_engine_ready")
        assert (await client.get("/health")).status_code == 200


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("cut-stream", "upstream_error"),
        ("stall-stream", "upstream_timeout"),
        ("no-done", "upstream_error"),
        ("abort", "engine_aborted"),  # vLLM's own clean-looking end of a request it aborted
    ],
)
async def test_error_after_stream_start_is_one_event_then_done(
    gw: httpx.AsyncClient, mode: str, code: str
) -> None:
    r = await gw.post("/v1/chat/completions", json=_chat(mode, stream=True))
    assert r.status_code == 200  # the stream had started: the status is already sent
    events = _events(r)
    assert [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:2]] == ["one", "two"]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])
    assert error["error"]["code"] == code
    assert len(events) == 4
    metrics = (await gw.get("/metrics")).text
    assert f'tiergate_stream_errors_total{{kind="{code}",model="{mode}"}} 1.0' in metrics


@pytest.mark.parametrize(
    ("mode", "code"),
    [
        ("cut-stream", "upstream_error"),
        ("stall-stream", "upstream_timeout"),
        ("no-done", "upstream_error"),
    ],
)
async def test_a_responses_stream_that_fails_ends_with_one_error_event_then_done(
    gw: httpx.AsyncClient, mode: str, code: str
) -> None:
    # The Responses API's stream has no [DONE] of its own; a failure ends it as any other.
    body = {"model": mode, "input": "hi", "stream": True}
    r = await gw.post("/v1/responses", json=body)
    assert r.status_code == 200
    events = r.text.split("\n\n")[:-1]
    assert events[0].startswith("event: response.created\n")
    assert json.loads(events[1].split("data: ")[1])["delta"] == "one"
    assert events[-1] == "data: [DONE]" and len(events) == 4
    assert json.loads(events[-2].removeprefix("data: "))["error"]["code"] == code
    metrics = (await gw.get("/metrics")).text
    assert f'tiergate_stream_errors_total{{kind="{code}",model="{mode}"}} 1.0' in metrics


async def test_a_responses_stream_ends_at_its_last_event_with_its_usage_counted(
    gw: httpx.AsyncClient,
) -> None:
    r = await gw.post("/v1/responses", json={"model": "ok", "input": "hi", "stream": True})
    assert r.status_code == 200
    events = r.text.split("\n\n")[:-1]
    assert events[-1].startswith("event: response.completed\n")  # nothing added after it
    assert "[DONE]" not in r.text and len(events) == 3
    # The engine's own error event passes as it came and ends the stream.
    r = await gw.post("/v1/responses", json={"model": "error-event", "input": "hi", "stream": True})
    assert r.status_code == 200 and "[DONE]" not in r.text
    assert r.text.split("\n\n")[-2].startswith("event: error\n")
    unary = await gw.post("/v1/responses", json={"model": "ok", "input": "hi"})
    assert unary.status_code == 200 and unary.json()["usage"]["output_tokens"] == 2
    metrics = (await gw.get("/metrics")).text
    assert 'tiergate_prompt_tokens_total{model="ok"} 10.0' in metrics  # 5 + 5
    assert 'tiergate_completion_tokens_total{model="ok"} 4.0' in metrics
    assert 'tiergate_stream_errors_total{kind="engine_error",model="error-event"} 1.0' in metrics


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            "max_completion_tokens",
        ),
        ("/v1/responses", {"input": "hi"}, "max_output_tokens"),
    ],
)
async def test_a_tiers_output_limit_is_400_naming_the_clients_field(
    fake: FakeEngine, path: str, body: dict, param: str
) -> None:
    settings = Settings(
        engines=[{"name": "e", "model": "ok", "url": fake.url}],
        tiers=[
            {"name": "small", "model": "ok", "engines": ["e"], "limits": {"max_output_tokens": 4}}
        ],
    )
    async with in_process_gateway(settings) as client:
        asked = {"model": "ok", **body, param: 5}
        err = _error(await client.post(path, json=asked), 400, None)
        assert err["param"] == param and err["message"].startswith(f"{param} is 5")
        assert (await client.post(path, json={**asked, param: 4})).status_code == 200


async def test_api_keys_guard_the_openai_routes_only() -> None:
    """With keys set, /v1/* need one (401 in the OpenAI shape); probes and metrics stay open."""
    settings = Settings(
        engines=[{"name": "fake", "model": "ok", "url": GONE_URL}],
        server={"api_keys": ["k-one", "k-two"]},
    )
    async with in_process_gateway(settings) as client:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "k-one"}):
            r = await client.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            assert r.json()["error"]["type"] == "invalid_request_error"
        r = await client.post("/v1/chat/completions", json={"model": "ok", "messages": []})
        assert r.status_code == 401
        assert (await client.get("/tiergate/engines")).status_code == 401
        ok = await client.get("/v1/models", headers={"Authorization": "Bearer k-two"})
        assert ok.status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200
