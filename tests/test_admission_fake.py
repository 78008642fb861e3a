"""The gateway's own admission (server.max_in_flight) on the real HTTP server: the 429 is
answered from the HTTP parser's callback (serving/api/admission.py), in the OpenAI
shape, with Retry-After and a spread Retry-After-Ms; the refused request never reaches
an engine; the connection stays usable; the slots come back. A FAKE engine holds the
streams open (a real one cannot be made to stall on demand)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.config import Settings
from tests.fake_engine import FakeEngine, in_process_gateway, served

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _settings(url: str, limit: int) -> Settings:
    return Settings(
        engines=[{"name": "e", "model": "m", "url": url}],
        timeouts={"health_interval": 0.1},
        server={"max_in_flight": limit},
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    status = int(head.split(" ", 2)[1])
    headers = dict(
        (k.strip().lower(), v.strip())
        for k, v in (line.split(":", 1) for line in head.split("\r\n")[1:] if line)
    )
    return status, headers, await reader.readexactly(int(headers["content-length"]))


def _request(path: str, body: bytes, extra: str = "") -> tuple[bytes, bytes]:
    """A POST's head and body, to send apart."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{extra}\r\n"
    )
    return head.encode(), body


def _metric(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def test_refused_in_the_parser_callback_keeps_the_connection_and_loses_nothing() -> None:
    with FakeEngine(force="stall-stream") as fake:
        async with served(_settings(fake.url, 2)) as (app, url), httpx.AsyncClient() as http:
            # two streams take both slots and stay open (the engine stalls after two events)
            holders = []
            for _ in range(2):
                stream = http.stream("POST", url + "/v1/chat/completions", json=CHAT)
                r = await stream.__aenter__()
                assert r.status_code == 200
                holders.append((stream, r))
            assert app.state.hot.in_flight == 2

            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head, body = _request("/v1/chat/completions", json.dumps(CHAT).encode())
            writer.write(head)  # the body comes later: the 429 must not wait for it
            status, headers, payload = await asyncio.wait_for(_read_response(reader), 2)
            assert status == 429
            assert headers["retry-after"] == "1"
            assert 500 <= int(headers["retry-after-ms"]) <= 1500
            assert headers["content-type"] == "application/json" and "date" in headers
            error = json.loads(payload)["error"]
            assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
            assert "at capacity (in_flight)" in error["message"] and error["param"] is None
            writer.write(body)  # read and dropped: the next request on the line is in step

            spreads = set()
            for path in ("/v1/completions", "/v1/chat/completions", "/v1/responses"):
                h, b = _request(path, b'{"model": "m", "prompt": "x"}')
                writer.write(h + b)
                status, headers, _ = await asyncio.wait_for(_read_response(reader), 2)
                assert status == 429
                spreads.add(headers["retry-after-ms"])
            assert len(spreads) == 3  # each refusal gets its own share of the spread
            writer.write(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
            status, _, _ = await asyncio.wait_for(_read_response(reader), 2)
            assert status == 200  # the same keep-alive connection still serves

            metrics = (await http.get(url + "/metrics")).text
            assert _metric(metrics, 'tiergate_admission_refused_total{reason="in_flight"}') == 4
            assert _metric(metrics, "tiergate_admission_paced_total") == 0  # within the budget
            assert len(fake.app.state.seen) == 2  # nothing refused reached the engine

            # Connection: close is obeyed on a refusal too
            h, b = _request(
                "/v1/chat/completions", json.dumps(CHAT).encode(), "connection: close\r\n"
            )
            writer.write(h + b)
            status, headers, _ = await asyncio.wait_for(_read_response(reader), 2)
            assert (status, headers["connection"]) == (429, "close")
            assert await asyncio.wait_for(reader.read(), 2) == b""  # closed by the gateway
            writer.close()

            for stream, _ in holders:
                await stream.__aexit__(None, None, None)
            for _ in range(40):
                if app.state.hot.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert app.state.hot.in_flight == 0  # the slots came back
            assert [ep.in_flight for ep in app.state.registry.endpoints] == [0]
            # and a new request is admitted again
            async with http.stream("POST", url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status_code == 200


async def test_what_the_front_counted_is_refused_only_for_loop_lag() -> None:
    """Requests counted before they reach the gateway (serving/front holds
    max_in_flight; here a protocol that says so, as the front's does) are not refused
    for the gateway's own in-flight count, but are for its loop lag, which only the
    gateway sees: a 429 with reason loop_lag, nothing sent to the engine."""
    from serving.api.admission import AdmittingProtocol
    from serving.api.hotpath import LoopLag

    class Counted(AdmittingProtocol):
        refuses_whole = False  # as the front's: what it hands, it counted

        def admitted_elsewhere(self) -> bool:
            return True

    with FakeEngine(force="stall-stream") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            server={"max_in_flight": 1, "max_loop_lag_ms": 50},
        )
        async with served(settings, http=Counted) as (app, url), httpx.AsyncClient() as http:
            hot = app.state.hot
            hot.lag = LoopLag()  # not running: its lag is what the test sets
            held = []
            for _ in range(2):  # two past max_in_flight 1: the front counted them
                stream = http.stream("POST", url + "/v1/chat/completions", json=CHAT)
                r = await stream.__aenter__()
                assert r.status_code == 200
                held.append(stream)
            assert hot.in_flight == 2

            hot.lag.lag_ms = 80.0  # the loop runs late: the core is saturated
            r = await http.post(url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 429 and "retry-after-ms" in r.headers
            error = r.json()["error"]
            assert error["code"] == "rate_limit_exceeded" and "(loop_lag)" in error["message"]
            metrics = (await http.get(url + "/metrics")).text
            assert _metric(metrics, 'tiergate_admission_refused_total{reason="loop_lag"}') == 1
            assert _metric(metrics, 'tiergate_admission_refused_total{reason="in_flight"}') == 0
            assert len(fake.app.state.seen) == 2  # the refused one never reached it
            assert hot.in_flight == 2

            hot.lag.lag_ms = 0.0
            for stream in held:
                await stream.__aexit__(None, None, None)
            async with http.stream("POST", url + "/v1/chat/completions", json=CHAT) as r:
                assert r.status_code == 200
            for _ in range(40):
                if hot.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert hot.in_flight == 0


async def test_a_burst_cannot_slip_past_the_limit() -> None:
    # Many requests read in one pass of the loop: each takes its slot as it is parsed,
    # before any of their tasks has run, so no more than the limit are admitted.
    with FakeEngine(force="stall-stream") as fake:
        async with served(_settings(fake.url, 3)) as (app, url):
            port = int(url.rsplit(":", 1)[1])
            conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(12)]
            head, body = _request("/v1/chat/completions", json.dumps(CHAT).encode())
            for _, writer in conns:
                writer.write(head + body)
            statuses = []
            for reader, _ in conns:
                line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
                statuses.append(int(line.split(b" ", 2)[1]))
            assert sorted(statuses) == [200] * 3 + [429] * 9
            assert app.state.hot.in_flight == 3
            for _, writer in conns:
                writer.close()
            for _ in range(40):
                if app.state.hot.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            assert app.state.hot.in_flight == 0
            assert [ep.in_flight for ep in app.state.registry.endpoints] == [0]


async def test_another_asgi_server_gets_the_same_refusal() -> None:
    # Without uvicorn's protocol (here httpx's ASGI transport) the hot path admits itself.
    with FakeEngine(force="slow") as fake:
        async with in_process_gateway(_settings(fake.url, 1)) as client:
            body = {**CHAT, "stream": False}
            first = asyncio.create_task(client.post("/v1/chat/completions", json=body))
            await asyncio.sleep(0.3)
            second = await client.post("/v1/chat/completions", json=body)
            assert second.status_code == 429
            assert second.headers["retry-after"] == "1"
            assert 500 <= int(second.headers["retry-after-ms"]) <= 1500
            assert second.json()["error"]["code"] == "rate_limit_exceeded"
            assert (await first).status_code == 200
            assert client.app.state.hot.in_flight == 0


async def test_a_refusal_storm_is_paced_per_connection() -> None:
    """Past server.max_refusals_s, a refused connection is not read again until its
    Retry-After-Ms has passed: a client that re-sends at once gets its next answer only
    then (a 429 again, the connection still usable), not a burst of refusals; a client
    within the budget is answered at once. Nothing is lost and the slot comes back."""
    with FakeEngine(force="stall-stream") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            server={"max_in_flight": 1, "max_refusals_s": 1},
        )
        async with served(settings) as (app, url), httpx.AsyncClient() as http:
            stream = http.stream("POST", url + "/v1/chat/completions", json=CHAT)
            r = await stream.__aenter__()  # holds the only slot
            assert r.status_code == 200

            port = int(url.rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head, body = _request("/v1/chat/completions", json.dumps(CHAT).encode())
            writer.write(head + body)  # within the budget (1 a second): answered at once
            status, headers, _ = await asyncio.wait_for(_read_response(reader), 2)
            assert status == 429
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            writer.write(head + body)  # the budget is spent: refused, then paced
            status, headers, _ = await asyncio.wait_for(_read_response(reader), 2)
            assert status == 429 and loop.time() - t0 < 0.4
            wait = int(headers["retry-after-ms"]) / 1000
            t1 = loop.time()
            writer.write(head + body)  # re-sent at once: read only after that wait
            status, headers, payload = await asyncio.wait_for(_read_response(reader), 3)
            waited = loop.time() - t1
            assert status == 429 and json.loads(payload)["error"]["code"] == "rate_limit_exceeded"
            assert wait - 0.05 <= waited <= wait + 1.0
            assert len(fake.app.state.seen) == 1  # no refused request reached the engine

            await stream.__aexit__(None, None, None)
            for _ in range(40):  # the slot comes back; the paced connection is served
                if app.state.hot.in_flight == 0:
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(float(headers["retry-after-ms"]) / 1000)
            writer.write(head + body)
            status, _, _ = await asyncio.wait_for(_read_response_start(reader), 3)
            assert status == 200
            writer.close()
            metrics = (await http.get(url + "/metrics")).text
            assert _metric(metrics, 'tiergate_admission_refused_total{reason="in_flight"}') == 3
            assert _metric(metrics, "tiergate_admission_paced_total") >= 1


async def _read_response_start(reader: asyncio.StreamReader) -> tuple[int, str, None]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    return int(head.split(" ", 2)[1]), head, None


def test_retry_after_scales_are_powers_of_two_up_to_the_max() -> None:
    from serving.api.retry_scale import retry_after_scales, scale_for

    assert retry_after_scales(1) == (1,)
    assert retry_after_scales(4) == (1, 2, 4)
    assert retry_after_scales(6) == (1, 2, 4, 6)
    scales = (1, 2, 4)
    # the largest scale at or under the clients waiting per slot
    assert [scale_for(x, scales) for x in (0, 0.9, 1, 1.99, 2, 3.9, 4, 500)] == [
        0, 0, 0, 0, 1, 1, 2, 2
    ]  # fmt: skip


def test_the_retry_scale_steps_once_a_second_and_drops_after_a_quiet_spell() -> None:
    from serving.api.retry_scale import RetryScale

    scale = RetryScale((1, 2, 4), retry_after_s=1, max_in_flight=10)
    t = scale.window[0]
    assert not any(scale.refused(t + i / 100) for i in range(50))  # within the first second
    assert scale.refused(t + 1.0) and scale.at == 1  # 50/s x 1 s = 5 per slot: one step
    for i in range(60):
        scale.refused(t + 1.01 + i / 100)
    assert scale.refused(t + 2.0) and scale.at == 2  # 60/s x 2 s = 12 per slot: the max
    assert scale.refused(t + 3.0) and scale.at == 1  # one refusal that second: one step down
    for i in range(60):
        scale.refused(t + 3.01 + i / 100)
    assert scale.refused(t + 4.0) and scale.at == 2
    assert scale.refused(t + 15.5) and scale.at == 0  # 11.5 s quiet: back to 1 at once
    off = RetryScale((1, 2, 4), retry_after_s=1, max_in_flight=0)  # loop-lag refusals only
    t = off.window[0]
    for i in range(500):
        off.refused(t + i / 100)
    assert off.at == 0


async def test_a_sustained_overload_is_asked_to_wait_longer_then_not() -> None:
    """The gateway's own 429s ask for more than router.spill.retry_after_s while more
    clients wait than there are slots (refusals a second x the retry-after they were
    given, over max_in_flight): one step a second, up to server.retry_after_max_scale,
    in both headers, the message and a gauge; after a quiet spell, back to 1 at once.
    With the max at 1 the refusals never change. Real HTTP: the parser callback's 429."""
    with FakeEngine(force="stall-stream") as fake:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": fake.url}],
            server={"max_in_flight": 1, "max_refusals_s": 10_000},  # never paced here
            router={"spill": {"retry_after_s": 1}},
        )
        async with served(settings) as (app, url), httpx.AsyncClient() as http:
            stream = http.stream("POST", url + "/v1/chat/completions", json=CHAT)
            assert (await stream.__aenter__()).status_code == 200  # the only slot
            hot = app.state.hot

            async def refused() -> tuple[int, float]:
                r = await http.post(url + "/v1/chat/completions", json=CHAT)
                assert r.status_code == 429
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert f"retry after {r.headers['retry-after']}s" in r.json()["error"]["message"]
                return int(r.headers["retry-after"]), int(r.headers["retry-after-ms"]) / 1000

            assert await refused() == (1, pytest.approx(1, abs=0.5))
            seen = set()
            for _ in range(3):  # ~20 refusals a second for one slot: scale 2, then 4
                # a second has passed, 20 refused
                hot.retry_scale.window = (hot.retry_scale.window[0] - 1.0, 20)
                after, wait = await refused()
                assert after / 2 <= wait <= after * 1.5  # spread over 0.5-1.5x
                seen.add(after)
            assert seen == {2, 4} and after == 4  # one step a second, then the max
            metrics = (await http.get(url + "/metrics")).text
            assert _metric(metrics, "tiergate_admission_retry_after_scale") == 4
            hot.retry_scale.window = (hot.retry_scale.window[0] - 11.0, 0)  # a quiet spell
            assert (await refused())[0] == 1
            await stream.__aexit__(None, None, None)
            assert len(fake.app.state.seen) == 1  # no refused request reached the engine

        settings.server.retry_after_max_scale = 1
        async with served(settings) as (app, url), httpx.AsyncClient() as http:
            stream = http.stream("POST", url + "/v1/chat/completions", json=CHAT)
            assert (await stream.__aenter__()).status_code == 200
            for _ in range(3):
                scale = app.state.hot.retry_scale
                scale.window = (scale.window[0] - 1.0, 500)
                r = await http.post(url + "/v1/chat/completions", json=CHAT)
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
            await stream.__aexit__(None, None, None)
