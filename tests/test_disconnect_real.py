"""A client that leaves mid-stream frees the real engine's slot."""

from __future__ import annotations

import re
import time

import httpx

from tests.utils import GatewayProcess


def _running(engine_url: str) -> float:
    text = httpx.get(engine_url + "/metrics", timeout=10).text
    values = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    assert values, "vLLM exports vllm:num_requests_running"
    return sum(float(v) for v in values)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_client_disconnect_aborts_engine_request(gateway: GatewayProcess, model: str) -> None:
    engine_url = gateway.engines()[0]["url"]
    assert _running(engine_url) == 0
    body = {
        "model": model,
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(10)]
        assert any(line.startswith("data: ") for line in got)
        assert _running(engine_url) == 1  # it is generating for us right now
        # The gateway's scrape sees it too, from vLLM's filtered /metrics/ (~1 KB).
        seen = gateway.engines()[0]
        assert seen["scrape_path"].startswith("/metrics/?name%5B%5D=vllm:")
        assert _wait(lambda: gateway.engines()[0]["load"]["running"] == 1, timeout=5)
        name = seen["name"]
        line = f'tiergate_engine_requests_running{{engine="{name}"}} 1.0'
        assert _wait(lambda: line in gateway.get("/metrics").text, timeout=5)
        assert gateway.engines()[0]["scrape_path"] == seen["scrape_path"]  # no fallback
    # The client hung up long before 1500 tokens; the engine must stop generating.
    assert _wait(lambda: _running(engine_url) == 0, timeout=10), "engine still generating"
    assert _wait(lambda: gateway.engines()[0]["in_flight"] == 0, timeout=5)
    assert _wait(lambda: gateway.engines()[0]["load"]["running"] == 0, timeout=5)
    metrics = gateway.get("/metrics").text
    pattern = r'tiergate_client_disconnects_total\{model="' + model + r'"\} [1-9]'
    assert re.search(pattern, metrics)


def test_a_responses_stream_left_mid_way_aborts_the_engine_request(
    gateway: GatewayProcess, model: str
) -> None:
    # The Responses API's stream takes the same path out: the engine stops, nothing stays.
    engine_url = gateway.engines()[0]["url"]
    assert _running(engine_url) == 0
    before = gateway.get("/metrics").text
    body = {"model": model, "input": "Tell me a long story.", "max_output_tokens": 1500}
    body |= {"stream": True, "ignore_eos": True}
    with httpx.stream("POST", gateway.url + "/v1/responses", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(20)]
        assert "event: response.output_text.delta" in got
        assert _running(engine_url) == 1
    assert _wait(lambda: _running(engine_url) == 0, timeout=10), "engine still generating"
    assert _wait(lambda: gateway.engines()[0]["in_flight"] == 0, timeout=5)
    pattern = r'tiergate_client_disconnects_total\{model="' + model + r'"\} ([0-9.]+)'
    count = re.search(pattern, gateway.get("/metrics").text)
    was = re.search(pattern, before)
    assert count and float(count[1]) == (float(was[1]) if was else 0.0) + 1
