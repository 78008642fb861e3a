"""Draining the real vLLM engine in a planned restart (POST /tiergate/engines/NAME/restart):
its stream in flight completes; a request that arrives meanwhile waits for it to come
back (router.wait_ready_s); past the drain time, a stream ends with the error event and
[DONE], never a silent cut."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx

from tests.utils import GatewayProcess, default_engine, write_config

MODEL = "smollm2-135m-instruct"
ENGINE = "smollm2-cpu"
# At this host's ~40 tok/s a stream, the short stream needs ~2 s of the 10 s drain
# and the long one ~40 s: room for a host 4x slower or 3.5x faster.
SHORT, LONG = 80, 1500  # tokens of the stream that ends in the drain, and of the cut one
DRAIN_S = 10.0


def _stream(url: str, events: list[str], first: threading.Event, tokens: int) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                first.set()


def test_planned_restart_drains_then_cuts_cleanly_past_the_drain_time(tmp_path: Path) -> None:
    """One restart covers both ends of the drain: a short stream in flight runs to its
    end within the drain time, a long one is still open when it is over and ends with
    the error event and [DONE]. (One engine restart, not two: the suite's budget.)"""
    config = write_config(
        tmp_path / "c.yaml", engines=[default_engine()], router={"wait_ready_s": 180}
    )
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready()
        pid = gw.get("/tiergate/engines").json()["engines"][0]["pid"]

        short: list[str] = []
        long: list[str] = []
        started = [threading.Event(), threading.Event()]
        streamers = [
            threading.Thread(target=_stream, args=(gw.url, short, started[0], SHORT)),
            threading.Thread(target=_stream, args=(gw.url, long, started[1], LONG)),
        ]
        for t in streamers:
            t.start()
        assert all(e.wait(120) for e in started), gw.log_tail()
        restart: dict = {}

        def do_restart() -> None:
            r = httpx.post(
                f"{gw.url}/tiergate/engines/{ENGINE}/restart",
                params={"drain_timeout": DRAIN_S},
                timeout=300,
            )
            restart.update(status=r.status_code, body=r.json())

        restarter = threading.Thread(target=do_restart)
        restarter.start()
        for _ in range(100):  # it is draining: no new work goes to it
            state = gw.get("/tiergate/engines").json()["engines"][0]["state"]
            if state == "draining":
                break
            threading.Event().wait(0.05)
        assert state == "draining"
        assert short[-1] != "[DONE]"  # the short stream is in flight as the drain starts
        # A request that arrives now waits for the engine to come back, then succeeds.
        late = httpx.post(
            gw.url + "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            timeout=300,
        )
        for t in (*streamers, restarter):
            t.join(300)
        # The short stream ran to its end during the drain.
        assert short[-1] == "[DONE]" and not any('"error"' in e for e in short), short[-3:]
        # The whole answer came: the engine counted every token (vLLM may put several
        # tokens in one chunk when the client reads slower than it decodes).
        chunks = [json.loads(e) for e in short[:-1]]
        assert chunks[-1]["usage"]["completion_tokens"] == SHORT, chunks[-1]
        assert any(c["choices"] and c["choices"][0]["finish_reason"] == "length" for c in chunks)
        # The long one was open when the drain time ran out: one error event, then [DONE].
        assert long[-1] == "[DONE]", long[-3:]
        error = json.loads(long[-2])["error"]
        assert error["message"] and error["type"], error
        assert 1 < sum('"content"' in e for e in long) < LONG
        assert late.status_code == 200, late.text
        assert restart["status"] == 200 and restart["body"]["restarts"] == 1, restart
        engine = gw.get("/tiergate/engines").json()["engines"][0]
        assert engine["state"] == "ready" and engine["pid"] != pid
        # Bad asks get the OpenAI envelope.
        missing = httpx.post(f"{gw.url}/tiergate/engines/nope/restart", timeout=30)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert not gw.survivors(), f"orphans: {gw.survivors()}"
