"""SIGTERM while streams are in flight, against a FAKE engine that streams slowly: the
listener closes, streams that end within `server.drain_timeout` end normally, and the
rest end with one error event and [DONE], never mid-event."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.fake_engine import FakeEngine
from tests.utils import GatewayProcess


def _serve(tmp_path: Path, fake: FakeEngine, drain: float) -> GatewayProcess:
    config = tmp_path / "g.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"drain_timeout": drain},
                "engines": [{"name": "fake", "model": "m", "url": fake.url}],
                "timeouts": {"health_interval": 0.2},
            }
        )
    )
    return GatewayProcess(config, tmp_path / "serve.log")


def _stream(url: str, out: list[str]) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        out.extend(line for line in r.iter_lines() if line.startswith("data: "))


@pytest.mark.parametrize(("drain", "cut"), [(20.0, False), (0.5, True)])
def test_sigterm_drains_or_ends_streams_cleanly(tmp_path: Path, drain: float, cut: bool) -> None:
    with FakeEngine(force="trickle") as fake, _serve(tmp_path, fake, drain) as gw:
        gw.wait_ready(60)
        events: list[str] = []
        client = threading.Thread(target=_stream, args=(gw.url, events))
        client.start()
        time.sleep(1.5)  # the 6 s stream is under way
        started = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # no new connections once draining
            httpx.get(gw.url + "/health", timeout=2)
        client.join(30)
        assert gw.proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises it when done
        assert events[-1] == "data: [DONE]"
        errors = [e for e in events if '"error"' in e]
        if cut:
            assert time.monotonic() - started < 5  # did not wait for the stream
            assert len(errors) == 1 and "shutting_down" in errors[0]
            assert events[-2] == errors[0]
        else:
            assert errors == [] and len(events) == 60 + 1  # every token, then [DONE]
    assert not gw.survivors()


def test_server_wakes_for_should_exit_not_for_a_tick() -> None:
    """GatewayServer's main loop sleeps between ticks; setting `should_exit` (as a signal
    handler or our own code does) ends it at once, not at the next tick."""
    import asyncio

    import uvicorn

    from serving.api.server import GatewayServer

    async def app(scope, receive, send) -> None:  # a bare ASGI app; lifespan unsupported
        if scope["type"] != "http":
            raise RuntimeError("lifespan unsupported")

    async def main() -> float:
        server = GatewayServer(uvicorn.Config(app, port=0, log_level="warning", lifespan="off"))
        server.tick_s = 3600.0
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn only exposes a flag)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # in main_loop's wait by now
        started = time.monotonic()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        return time.monotonic() - started

    assert asyncio.run(main()) < 20  # an hour's tick was not waited for
