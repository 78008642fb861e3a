"""The happy path, through the gateway to the real vLLM engine, with the official SDK."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from openai import OpenAI

from tests.promql import metric_names
from tests.utils import REPO, GatewayProcess

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_non_streamed_answers_sensibly(client: OpenAI, model: str) -> None:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, max_tokens=30, temperature=0
    )
    # What the answer says is the golden gate's job (test_quality_real.py), not this test's.
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model == model
    assert reply.usage.prompt_tokens > 5
    assert 0 < reply.usage.completion_tokens <= 30
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streamed_usage_matches_streamed_tokens(client: OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=QUESTION,
        max_tokens=30,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"return_token_ids": True},  # a vLLM field: passes through untouched
    )
    text, token_ids, usage, finish = [], [], None, None
    for chunk in stream:
        if chunk.choices:
            choice = chunk.choices[0]
            text.append(choice.delta.content or "")
            token_ids += (choice.model_extra or {}).get("token_ids") or []
            finish = choice.finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(text).strip()
    assert finish in ("stop", "length")
    assert usage is not None
    assert usage.completion_tokens == len(token_ids) > 0


def test_stream_without_include_usage_has_no_usage_chunk(
    gateway: GatewayProcess, model: str
) -> None:
    # The gateway asks the engine for usage (for its metrics) but must not leak it.
    body = {"model": model, "messages": QUESTION, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", gateway.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert not any('"usage":{' in e for e in events)
    assert all('"choices":[]' not in e for e in events)


def test_completions_streamed_and_not(client: OpenAI, model: str) -> None:
    reply = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(
            model=model,
            prompt="The capital of France is",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == reply.choices[0].text
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_uninterpreted_fields_pass_through(client: OpenAI, model: str) -> None:
    sampling = {"max_tokens": 12, "n": 2, "seed": 7, "temperature": 0.8, "stop": ["\n"]}
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, logprobs=True, top_logprobs=2, **sampling
    )
    assert len(reply.choices) == 2
    for choice in reply.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        assert len(choice.logprobs.content[0].top_logprobs) == 2
        assert "\n" not in choice.message.content
    # Bitwise-equal seeded samples are not guaranteed across batches on every CPU (they
    # differed on an AMX host), so show that `seed` reaches the engine by its own check.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2, seed="x")
    assert refused.value.status_code == 400
    assert "seed" in str(refused.value.body)


def test_models_health_ready(gateway: GatewayProcess, client: OpenAI, model: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model, "all-minilm-l6-v2", "auto"]
    assert models.data[0].model_extra["max_model_len"] == 2048
    assert all(m.model_extra["ready"] for m in models.data)
    for card in models.data:  # the SDK's retrieve gives the same card as the list
        assert client.models.retrieve(card.id) == card
    assert gateway.get("/health").json() == {"status": "ok"}
    ready = gateway.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["engines"] == ["smollm2-cpu", "minilm-cpu"]


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_and_tokens(
    gateway: GatewayProcess, client: OpenAI, model: str
) -> None:
    before = gateway.get("/metrics").text
    reply = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6)
    list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=6, stream=True))
    after = gateway.get("/metrics").text
    ok = {"model": model, "endpoint": "/v1/chat/completions", "status": "200"}
    assert (
        _metric(after, "tiergate_requests_total", **ok)
        - _metric(before, "tiergate_requests_total", **ok)
        == 2
    )
    prompt = _metric(after, "tiergate_prompt_tokens_total") - _metric(
        before, "tiergate_prompt_tokens_total"
    )
    assert prompt == 2 * reply.usage.prompt_tokens  # streams are counted too
    assert (
        _metric(after, "tiergate_time_to_first_token_seconds_count")
        - _metric(before, "tiergate_time_to_first_token_seconds_count")
        == 1
    )
    assert (
        _metric(after, "tiergate_e2e_request_latency_seconds_count")
        - _metric(before, "tiergate_e2e_request_latency_seconds_count")
        == 2
    )
    assert re.search(r'tiergate_engine_ready\{engine="smollm2-cpu"\} 1\.0', after)


def test_responses_api_streamed_and_not_with_usage_counted(
    gateway: GatewayProcess, client: OpenAI, model: str
) -> None:
    # The SDK's responses API: vLLM serves it, the gateway routes it like a chat.
    before = gateway.get("/metrics").text
    reply = client.responses.create(
        model=model,
        instructions="Answer in one word.",
        input="Capital of France?",
        max_output_tokens=8,
        temperature=0,
    )
    assert reply.output_text.strip() and reply.model == model
    assert 0 < reply.usage.output_tokens <= 8 and reply.usage.input_tokens > 5
    deltas, kinds = [], []
    with client.responses.stream(
        model="auto",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        max_output_tokens=8,
        temperature=0,
    ) as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert "".join(deltas) == final.output_text and final.output_text.strip()
    after = gateway.get("/metrics").text
    done = {"endpoint": "/v1/responses", "status": "200"}
    for name in (model, "auto"):
        assert (
            _metric(after, "tiergate_requests_total", model=name, **done)
            - _metric(before, "tiergate_requests_total", model=name, **done)
            == 1
        )
    completion = _metric(after, "tiergate_completion_tokens_total") - _metric(
        before, "tiergate_completion_tokens_total"
    )
    assert completion == reply.usage.output_tokens + final.usage.output_tokens
    assert all(e["in_flight"] == 0 for e in gateway.engines())


def _exposed_names(text: str) -> set[str]:
    """Every metric name a scrape can query: samples, and declared families (a labelled
    counter with no samples yet still declares itself) with their suffixes."""
    names: set[str] = set()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            names.add(name)
            names.update(name.removesuffix("_total") + s for s in suffixes.get(kind, ()))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_queries_only_metrics_that_exist(
    gateway: GatewayProcess, client: OpenAI, model: str
) -> None:
    list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, stream=True))
    engine_url = gateway.get("/tiergate/engines").json()["engines"][0]["url"]
    exposed = _exposed_names(gateway.get("/metrics").text)
    exposed |= _exposed_names(httpx.get(engine_url + "/metrics", timeout=10).text)
    board = json.loads((REPO / "k8s" / "tiergate" / "dashboards" / "tiergate.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    queried = {m for e in exprs for m in metric_names(e)}  # and every query parses
    assert len(queried) > 15
    assert queried - exposed == set()


def test_engine_log_is_not_buried_in_polls(
    gateway: GatewayProcess, client: OpenAI, model: str
) -> None:
    client.chat.completions.create(model=model, messages=QUESTION, max_tokens=2)
    time.sleep(3)  # a few health polls and load scrapes
    engine = [ln for ln in gateway.log_path.read_text(errors="replace").splitlines()
              if ln.startswith("[smollm2-cpu]")]  # fmt: skip
    assert any("Starting vLLM" in ln or "non-default args" in ln for ln in engine)  # its lines
    # no access-log line at all: polls, scrapes (/metrics/?name[]=...) and requests alike
    assert not [ln for ln in engine if 'HTTP/1.1"' in ln]
