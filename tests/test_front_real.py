"""server.front against the real vLLM engine, with one gateway process and with two
workers (a front each): the openai SDK, streamed and not, over connections the front
parks and hands over; a client that leaves mid-stream still aborts the engine's
request; Ctrl-C stops the gateway and its fronts."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.test_disconnect_real import _running, _wait
from tests.test_front_fake import _fronts
from tests.utils import GatewayProcess


@pytest.mark.parametrize("workers", [1, 2])
def test_front_serves_the_real_engine(
    gateway: GatewayProcess, model: str, tmp_path: Path, workers: int
) -> None:
    engine_url = gateway.engines()[0]["url"]
    config = tmp_path / "front.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"front": True, "max_in_flight": 8, "workers": workers},
                "engines": [{"name": "cpu", "model": model, "url": engine_url}],
                "timeouts": {"health_interval": 0.5},
            }
        )
    )
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready(60)
        gw.wait_for(lambda: len(_fronts(gw)) == workers, 30, "a front per gateway process")
        client = OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Name a colour."}]
        for _ in range(2):  # the SDK's pooled connection, parked in the front in between
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=8)
            assert reply.choices[0].message.content
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=8,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = list(stream)
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        body = {"model": model, "prompt": "Once", "max_tokens": 1500, "ignore_eos": True}
        with httpx.stream(
            "POST", gw.url + "/v1/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(5))
            assert _running(engine_url) == 1
        assert _wait(lambda: _running(engine_url) == 0, timeout=10), "engine still generating"
        assert gw.stop(signal.SIGINT, timeout=60) in (0, 130), gw.log_tail()
    time.sleep(0.1)
    assert gw.seen and not gw.survivors(), gw.log_tail()
