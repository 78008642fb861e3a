"""Draining the real vLLM engine in a planned restart (POST /tiergate/engines/NAME/restart):
its stream in flight completes; a request that arrives meanwhile waits for it to come
back (router.wait_ready_s); past the drain time, a stream ends with the error event and
[DONE], never a silent cut."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx

from tests.utils import GatewayProcess, write_config

MODEL = "smollm2-135m-instruct"
ENGINE = "smollm2-cpu"


def _stream(url: str, events: list[str], first: threading.Event, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first.set()


def test_planned_restart_drains_then_cuts_cleanly_past_the_drain_time(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", router={"wait_ready_s": 180})
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready()
        pid = gw.get("/tiergate/engines").json()["engines"][0]["pid"]

        # 1. Drain: the stream in flight runs to its end, then the engine is replaced.
        events: list[str] = []
        first = threading.Event()
        streamer = threading.Thread(target=_stream, args=(gw.url, events, first, 400))
        streamer.start()
        assert first.wait(120), gw.log_tail()
        restart: dict = {}

        def do_restart() -> None:
            r = httpx.post(f"{gw.url}/tiergate/engines/{ENGINE}/restart", timeout=300)
            restart.update(status=r.status_code, body=r.json())

        restarter = threading.Thread(target=do_restart)
        restarter.start()
        for _ in range(100):  # it is draining: no new work goes to it
            state = gw.get("/tiergate/engines").json()["engines"][0]["state"]
            if state == "draining":
                break
            threading.Event().wait(0.05)
        assert state == "draining"
        # A request that arrives now waits for the engine to come back, then succeeds.
        late = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=300,
        )
        streamer.join(300)
        restarter.join(300)
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events[-3:]
        assert sum('"content"' in e for e in events) >= 390  # the whole answer came (~10 s)
        assert late.status_code == 200, late.text
        assert restart["status"] == 200 and restart["body"]["restarts"] == 1, restart
        engine = gw.get("/tiergate/engines").json()["engines"][0]
        assert engine["state"] == "ready" and engine["pid"] != pid

        # 2. Past the drain time: the stream still open ends with one error event + [DONE].
        events2: list[str] = []
        first2 = threading.Event()
        streamer = threading.Thread(target=_stream, args=(gw.url, events2, first2, 1500))
        streamer.start()
        assert first2.wait(120)
        r = httpx.post(
            f"{gw.url}/tiergate/engines/{ENGINE}/restart",
            params={"drain_timeout": 0.5},
            timeout=300,
        )
        streamer.join(300)
        assert r.status_code == 200 and r.json()["restarts"] == 2, r.text
        assert events2[-1] == "[DONE]", events2[-3:]
        error = json.loads(events2[-2])["error"]
        assert error["message"] and error["type"], error
        assert 1 < sum('"content"' in e for e in events2) < 1500
        # Bad asks get the OpenAI envelope.
        missing = httpx.post(f"{gw.url}/tiergate/engines/nope/restart", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert not gw.survivors(), f"orphans: {gw.survivors()}"
