"""Structured access log and trace propagation, against a FAKE engine that records the
headers it was sent (a real engine does not show them)."""

from __future__ import annotations

import json

import pytest

from serving.api.access_log import request_id, valid_traceparent
from serving.config import Settings
from tests.fake_engine import FakeEngine, in_process_gateway

pytestmark = pytest.mark.anyio
PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
SECRET_PROMPT = "my card number is 4111 1111 1111 1111"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_ids_and_traceparents_are_checked() -> None:
    assert request_id("abc-123") == "abc-123"
    generated = request_id(None)
    assert len(generated) == 32 and generated != request_id(None)
    assert request_id("bad id with spaces") != "bad id with spaces"
    assert request_id("x" * 200) != "x" * 200
    assert valid_traceparent(PARENT) == PARENT
    assert valid_traceparent("00-zz-1-01") is None and valid_traceparent(None) is None


async def test_one_json_line_per_request_and_ids_reach_the_engine(capsys) -> None:
    with FakeEngine("drip") as engine:
        settings = Settings(
            engines=[{"name": "e1", "model": "m", "url": engine.url}],
            server={"access_log": "json"},
            timeouts={"health_interval": 0.1},
        )
        async with in_process_gateway(settings) as client:
            chat = {"model": "m", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
            plain = await client.post(
                "/v1/chat/completions",
                json=chat,
                headers={"x-request-id": "abc-123", "traceparent": PARENT},
            )
            streamed = await client.post(
                "/v1/chat/completions",
                json={**chat, "stream": True},
                headers={"traceparent": "garbage"},
            )
            bad = await client.post("/v1/chat/completions", json={"model": "m"})
        out = capsys.readouterr().out

    assert plain.status_code == 200 and plain.headers["x-request-id"] == "abc-123"
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")
    generated = streamed.headers["x-request-id"]
    assert len(generated) == 32
    assert bad.status_code == 400 and len(bad.headers["x-request-id"]) == 32
    # What the engine was sent: the ids, and a traceparent only when it was valid.
    sent = engine.app.state.headers
    assert sent[0]["x-request-id"] == "abc-123" and sent[0]["traceparent"] == PARENT
    assert sent[1]["x-request-id"] == generated and "traceparent" not in sent[1]

    lines = _lines(out)
    assert [line["status"] for line in lines] == [200, 200, 400]
    first, second, third = lines
    assert first["request_id"] == "abc-123" and first["stream"] is False
    assert (first["tier"], first["replica"], first["retries"]) == ("m", "e1", 0)
    assert first["prompt_tokens"] == 3 and first["completion_tokens"] == 1
    assert first["duration_ms"] > 0 and "time" in first
    assert (first["tenant"], first["key"]) == ("default", "anonymous")  # an open gateway
    assert first["cost_usd"] == 0
    assert second["request_id"] == generated and second["stream"] is True
    assert second["completion_tokens"] == 20 and second["ttft_ms"] > 0
    assert third["error"] == "invalid_request_error"
    assert SECRET_PROMPT not in out  # never the prompt


async def test_access_log_is_off_by_default(capsys) -> None:
    with FakeEngine("ok") as engine:
        settings = Settings(
            engines=[{"name": "e1", "model": "m", "url": engine.url}],
            timeouts={"health_interval": 0.1},
        )
        async with in_process_gateway(settings) as client:
            r = await client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            )
    assert r.status_code == 200 and r.headers["x-request-id"]
    assert _lines(capsys.readouterr().out) == []


def test_redaction_of_sampled_prompts() -> None:
    from serving.api.access_log import prompt_text, redact

    text = (
        "write to jane.roe+ops@example.co.uk or call +44 20 7946 0958 / (555) 123-4567; "
        "my key is sk-proj-AbC123dEf456GhI789 and tg-0123abcd-"
        + "Z" * 20
        + "9" * 23
        + ", token ghp_1234567890abcdefABCDEF, aws AKIAIOSFODNN7EXAMPLE, "
        "order 12345 on 2026-11-26 costs 42.50"
    )
    clean = redact(text)
    for leaked in ("jane.roe", "7946", "123-4567", "sk-proj", "tg-0123", "ghp_", "AKIA"):
        assert leaked not in clean, leaked
    assert clean.count("[email]") == 1 and clean.count("[phone]") == 2
    assert clean.count("[key]") == 4
    assert "order 12345 on 2026-11-26 costs 42.50" in clean  # ordinary numbers stay
    chat = {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    }
    assert prompt_text(chat) == "system: be brief\nuser: hi"
    assert prompt_text({"prompt": "x" * 5000}) == "x" * 2000


async def test_a_sampled_prompt_is_logged_redacted(capsys) -> None:
    with FakeEngine("ok") as engine:
        settings = Settings(
            engines=[{"name": "e1", "model": "m", "url": engine.url}],
            server={"access_log": "json", "access_log_prompt_sample": 1.0},
            timeouts={"health_interval": 0.1},
        )
        async with in_process_gateway(settings) as client:
            content = "reach me at a.b@example.com, key sk-live-0123456789abcdef"
            chat = {"model": "m", "messages": [{"role": "user", "content": content}]}
            assert (await client.post("/v1/chat/completions", json=chat)).status_code == 200
        out = capsys.readouterr().out
    (line,) = _lines(out)
    assert line["prompt"] == "user: reach me at [email], key [key]"
    assert "a.b@example.com" not in out and "sk-live" not in out
