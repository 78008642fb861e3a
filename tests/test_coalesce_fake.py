"""One write where uvicorn would make two (serving/api/coalesce.py and the parser
callback's direct 429, serving/api/admission.py): a 429 leaves as one write, head and
body; a stream's head leaves with its first event and its [DONE] with the body's end.
uvicorn's own protocol runs on a transport that records each write; the streams run end
to end against a FAKE engine, whose connection must stay reusable after each."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from serving.api.admission import AdmittingProtocol, whole_request
from serving.api.coalesce import OneWrite, chunk_writer, head_with_body
from serving.api.hotpath import wire_head
from serving.config import Settings
from serving.upstream.stream import Relay, StreamOutcome
from tests.fake_engine import FakeEngine, served

pytestmark = pytest.mark.anyio

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}
REFUSAL = [
    {
        "type": "http.response.start",
        "status": 429,
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
    },
    {"type": "http.response.body", "body": b"{}", "more_body": False},
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recording:
    """A transport that keeps each write (a FAKE socket)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 5555)}.get(name, default)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class FullHot:
    """The hot path's admission when every slot is taken."""

    def __init__(self) -> None:
        self.asked = 0  # refusals decided in the parser callback
        self.refused_whole = 0  # ... and before uvicorn's parser
        self.wire_of = {id(REFUSAL): (wire_head(REFUSAL[0]), REFUSAL[1]["body"])}

    def full(self, counted: bool = False) -> str:
        return "in_flight"

    def refuse(self, why: str, kind: object) -> list[dict]:
        self.refused_whole += 1
        return REFUSAL

    def admit(self, kind: object, counted: bool = False) -> list[dict]:
        self.asked += 1
        return REFUSAL

    def pace_for(self, now: float) -> None:
        return None  # within the refusal budget


class Stub:
    def __init__(self) -> None:
        self.state = type("State", (), {"hot": FullHot()})()

    async def __call__(self, scope, receive, send) -> None:  # pragma: no cover - not reached
        raise AssertionError("a refused request reached the app")


def test_one_write_holds_the_head_for_the_body() -> None:
    t = Recording()
    w = OneWrite(t)
    w.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert t.writes == []
    w.write(b"body")
    w.write(b"more")
    assert t.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody", b"more"]
    lone = OneWrite(t)
    lone.write(b"HEAD")
    lone.close()  # a head with nothing after it still goes, before the close
    assert t.writes[-1] == b"HEAD" and t.closed


async def test_outside_uvicorn_nothing_changes() -> None:
    sent: list[dict] = []

    async def send(message: dict) -> None:  # another server's send: not a uvicorn cycle
        sent.append(message)

    with head_with_body(send):
        await send(REFUSAL[0])
        assert sent == [REFUSAL[0]]  # passed on at once, nothing held
        await send(REFUSAL[1])
    assert sent == REFUSAL


def _protocol_args(app: Stub) -> dict:
    """What uvicorn gives each connection's protocol, for `app`."""
    config = Config(app=app, http=AdmittingProtocol, lifespan="off", proxy_headers=False)
    config.access_log = False
    config.load()
    return {
        "config": config,
        "server_state": ServerState(),
        "app_state": {},
        "_loop": asyncio.get_running_loop(),
    }


def _protocol(app: Stub) -> tuple[AdmittingProtocol, Recording]:
    proto = AdmittingProtocol(**_protocol_args(app))
    transport = Recording()
    proto.connection_made(transport)
    return proto, transport


_BODY = json.dumps(CHAT).encode()
REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(_BODY), _BODY)
)


async def test_a_whole_request_is_refused_before_uvicorn_parses_it() -> None:
    app = Stub()
    proto, transport = _protocol(app)
    hot = app.state.hot
    for n in (1, 2):  # one plain request per read: refused from the hand-read head
        proto.data_received(REQUEST)
        assert (hot.refused_whole, hot.asked, len(transport.writes)) == (n, 0, n)
        assert proto.cycle is None  # uvicorn never saw it: no scope, no cycle
        assert proto.timeout_keep_alive_task is not None  # keep-alive timer re-armed
    assert proto.server_state.total_requests == 2
    assert transport.writes[0].startswith(b"HTTP/1.1 429 ") and not transport.closed
    assert transport.writes[0].endswith(b"\r\n\r\n{}")
    # a request split over two reads is uvicorn's to parse (and the callback's to refuse):
    # the parser is in step after the ones it never saw
    proto.data_received(REQUEST[:40])
    proto.data_received(REQUEST[40:])
    assert (hot.refused_whole, hot.asked, len(transport.writes)) == (2, 1, 3)
    assert proto.cycle.scope["path"] == "/v1/chat/completions"
    proto.connection_lost(None)


def test_whole_request_reads_only_plain_whole_hot_requests() -> None:
    assert whole_request(REQUEST) == "chat"
    assert whole_request(REQUEST.replace(b"/v1/chat/completions", b"/v1/completions")) == (
        "completion"
    )
    assert whole_request(REQUEST.replace(b"/v1/chat/completions", b"/v1/responses")) == ("response")
    assert whole_request(REQUEST.replace(b"/chat/completions", b"/chat/completions?x=1")) == (
        "chat"
    )
    assert whole_request(REQUEST[:-1]) is None  # the body is not all here
    assert whole_request(REQUEST.replace(b"POST", b"PUT")) is None
    assert whole_request(REQUEST.replace(b"/v1/chat/completions", b"/health")) is None
    assert whole_request(b"garbage\r\n\r\n") is None  # not HTTP: uvicorn's to answer
    assert whole_request(REQUEST.replace(b"host: gw", b"transfer-encoding: chunked")) is None


@pytest.mark.parametrize(
    "odd",
    [
        REQUEST.replace(b"HTTP/1.1", b"HTTP/1.0"),
        REQUEST.replace(b"host: gw", b"connection: close"),
        REQUEST.replace(b"host: gw", b"expect: 100-continue"),
        REQUEST.replace(b"/v1/chat/completions", b"/v1/chat/%63ompletions"),
        REQUEST + REQUEST[:10],  # something after it: pipelined
    ],
)
async def test_nothing_unusual_is_refused_by_hand(odd: bytes) -> None:
    app = Stub()
    proto, transport = _protocol(app)
    proto.data_received(odd)
    assert (app.state.hot.refused_whole, app.state.hot.asked) == (0, 1)  # uvicorn's
    assert transport.writes[0].startswith(b"HTTP/1.1 429 ")
    proto.connection_lost(None)


async def test_a_refusal_in_the_parser_callback_is_one_write_each() -> None:
    app = Stub()
    proto, transport = _protocol(app)
    proto.data_received(REQUEST * 3)  # pipelined: each refused in turn, in order
    assert app.state.hot.asked == 3
    assert len(transport.writes) == 3
    for write in transport.writes:
        assert write.startswith(b"HTTP/1.1 429 ") and write.endswith(b"\r\n\r\n{}")
        assert b"content-length: 2\r\n" in write and b"connection: close" not in write
    assert not transport.closed  # kept alive
    closing = REQUEST.replace(b"host: gw\r\n", b"host: gw\r\nconnection: close\r\n")
    proto.data_received(closing)  # the client asks to close: said, and done
    assert len(transport.writes) == 4 and transport.closed
    assert b"\r\nconnection: close\r\n" in transport.writes[-1]
    proto.connection_lost(None)


def test_the_done_chunk_ends_the_response() -> None:
    relay = Relay(response=None, outcome=StreamOutcome(started=0.0), drop_usage=False, first=b"")
    token = b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
    assert relay.message(token) == {"type": "http.response.body", "body": token, "more_body": True}
    last = relay.message(b"data: [DONE]\n\n")
    assert last == {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
    assert relay.ended and relay.outcome.done
    assert relay.message(token) is None  # nothing after the end


async def test_streams_end_whole_and_keep_the_engine_connection() -> None:
    with FakeEngine(force="late-end") as fake:  # vLLM too ends its body after [DONE]
        settings = Settings(engines=[{"name": "e", "model": "m", "url": fake.url}])
        async with served(settings) as (app, url), httpx.AsyncClient() as http:
            upstream = app.state.hot.proxy.upstream
            opened = upstream.open_count
            for _ in range(4):
                async with http.stream("POST", url + "/v1/chat/completions", json=CHAT) as r:
                    assert r.status_code == 200
                    text = (await r.aread()).decode()
                events = [e for e in text.split("\n\n") if e]
                assert events[-1] == "data: [DONE]" and len(events) >= 3
                assert all(e.startswith("data: {") for e in events[:-1])
                # the client has it all at [DONE]; the gateway still reads the engine's end
                for _ in range(100):
                    if app.state.hot.in_flight == 0 and upstream.busy == 0:
                        break
                    await asyncio.sleep(0.01)
                assert app.state.hot.in_flight == 0 and upstream.busy == 0
            # each stream's engine connection was read to its end and kept: a relay that
            # took uvicorn's "disconnect" after a complete response would close it (vLLM
            # would abort) and count a client disconnect
            assert upstream.open_count - opened <= 1  # a health poll may race a stream
            metrics = (await http.get(url + "/metrics")).text
            assert _total(metrics, "tiergate_client_disconnects_total") == 0
            assert _total(metrics, "tiergate_stream_errors_total") == 0
            ok = 'tiergate_requests_total{endpoint="/v1/chat/completions",model="m",status="200"}'
            assert _total(metrics, ok) == 4


def _total(text: str, prefix: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


class CountedHot(FullHot):
    """Full by its own count; what the front counted is admitted (the front holds the
    limit), as HotPath.admit does with counted=True."""

    def admit(self, kind: object, counted: bool = False) -> list[dict] | None:
        if counted:
            return None
        self.asked += 1
        return REFUSAL


async def test_a_request_the_front_counted_is_never_refused_by_hand() -> None:
    """Under server.front the gateway's own count may reach the limit while the front
    hands it a request it counted: the whole request, in one read, is admitted, not
    refused from the hand-read head (which would also use up the front's count)."""
    from serving.api.hotpath import ADMITTED
    from serving.front.handoff import FrontedProtocol

    app = Stub()
    app.state.hot = CountedHot()
    proto = FrontedProtocol(link=None, conn_id=1, counted=True, data=REQUEST, **_protocol_args(app))
    transport = Recording()
    proto.connection_made(transport)  # the handed request is read at once
    assert transport.writes == []  # no 429
    assert (app.state.hot.refused_whole, app.state.hot.asked) == (0, 0)
    assert proto.cycle.scope[ADMITTED] is True  # started, its slot taken
    for task in proto.tasks:
        task.cancel()
    await asyncio.sleep(0)
    proto.managed = False  # no front to report to
    proto.connection_lost(None)


class Streaming:
    """An app that starts a streamed response and hands its `send` to the test."""

    def __init__(self) -> None:
        self.send: asyncio.Future = asyncio.get_running_loop().create_future()
        self.finished = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        self.send.set_result(send)
        await self.finished.wait()


async def _started_stream() -> tuple[Streaming, object, Recording]:
    """uvicorn's own protocol, a request in, its streamed response started."""
    app = Streaming()
    proto = HttpToolsProtocol(**_protocol_args(app))
    transport = Recording()
    proto.connection_made(transport)
    proto.data_received(REQUEST)
    send = await asyncio.wait_for(app.send, 5)
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK\r\n")
    return app, send, transport


async def test_middle_chunks_skip_send_and_are_framed_as_uvicorn_frames_them() -> None:
    app, send, transport = await _started_stream()
    write = chunk_writer(send)
    relay = Relay(response=None, outcome=StreamOutcome(started=0.0), drop_usage=False, first=b"")
    relay.send, relay.write = send, write
    tokens = [b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i for i in range(3)]
    for token in tokens:
        relay._chunk(token)  # from the engine socket's read callback
    assert transport.writes[1:] == [b"%x\r\n%b\r\n" % (len(t), t) for t in tokens]
    # the same bytes uvicorn's send writes for a middle chunk
    await send({"type": "http.response.body", "body": tokens[0], "more_body": True})
    assert transport.writes[-1] == transport.writes[1]
    relay._chunk(b"data: [DONE]\n\n")  # the last chunk goes by send: the response ends
    await asyncio.sleep(0)
    assert transport.writes[-1] == b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    assert relay.ended and relay.pending is None
    assert write(tokens[0]) is False  # after the end: nothing more is written
    assert transport.writes[-1].endswith(b"0\r\n\r\n")
    app.finished.set()


async def test_the_chunk_writer_says_no_when_send_must_wait_and_drops_for_a_gone_client() -> None:
    app, send, transport = await _started_stream()
    write = chunk_writer(send)
    cycle = send.__self__
    cycle.flow.pause_writing()  # the client's socket is full: send waits for drain
    assert write(b"data: x\n\n") is False and len(transport.writes) == 1
    relay = Relay(
        response=Pausable(), outcome=StreamOutcome(started=0.0), drop_usage=False, first=b""
    )
    relay.send, relay.write = send, write
    relay._chunk(b"data: a\n\n")  # goes by send, which waits: the engine's reads pause
    assert relay.pending == [] and relay.response.paused
    relay._chunk(b"data: b\n\n")  # held, in order
    cycle.flow.resume_writing()
    await asyncio.wait_for(relay.resumer, 5)
    assert transport.writes[1:] == [b"9\r\ndata: a\n\n\r\n", b"9\r\ndata: b\n\n\r\n"]
    assert relay.pending is None and not relay.response.paused
    cycle.disconnected = True  # the client left: dropped, as send drops it
    assert write(b"data: c\n\n") is True and len(transport.writes) == 3
    app.finished.set()
    assert chunk_writer(lambda message: None) is None  # not uvicorn: every chunk by send


class Pausable:
    """The engine side of a relay (a FAKE response): records pause and resume."""

    paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None: ...


async def test_the_relay_cost_study_times_each_step() -> None:
    from benchmarks.studies.relay_cost import measure

    result = await measure(n=200, repeats=1)
    assert set(result) == {"read_callback_us", "relay_by_send_us", "relay_by_chunk_writer_us"}
    assert all(0 < v < 1000 for v in result.values())
