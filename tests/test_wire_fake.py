"""The engine client (serving/upstream/wire.py, client.py) against FAKE engines scripted
byte by byte: what a real vLLM cannot be made to do on demand (close an idle connection
as it is reused, stall mid-stream, send garbage), and the relay with a slow client."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from serving.config import TimeoutSettings
from serving.errors import NoEngineReady, UpstreamError, UpstreamTimeout
from serving.upstream.client import UpstreamClient
from serving.upstream.stream import Relay, StreamOutcome

pytestmark = pytest.mark.anyio
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def fake_engine(handler: Handler) -> AsyncIterator[str]:
    """A FAKE engine: each connection runs `handler` on the raw socket."""
    conns: list[asyncio.StreamWriter] = []

    async def on_conn(reader, writer) -> None:
        conns.append(writer)
        with contextlib.suppress(ConnectionError):
            await handler(reader, writer)

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        for w in conns:
            w.close()
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + (await reader.readexactly(length) if length else b"")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
EVENT = b'data: {"choices":[{"index":0,"delta":{"content":" x"}}]}\n\n'
USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n'
DONE = b"data: [DONE]\n\n"


def client(read: float = 5.0, max_connections: int = 8, pool: float = 5.0) -> UpstreamClient:
    return UpstreamClient(TimeoutSettings(read=read, pool=pool, connect=2.0), max_connections)


async def test_keep_alive_reuses_one_connection() -> None:
    async def handler(reader, writer) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with fake_engine(handler) as url:
        http = client()
        for _ in range(5):
            r = await http.open(url, "/v1/completions", b"{}")
            assert r.status == 200 and await r.read() == b"ok"
            r.release()
        assert http.open_count == 1 and http.busy == 0
        await http.close()


async def test_an_error_answer_read_to_its_end_keeps_the_connection() -> None:
    # vLLM answers a bad request with 400 and a JSON body: the connection stays usable.
    answers = iter([b"400 Bad Request", b"200 OK", b"400 Bad Request", b"200 OK"])

    async def handler(reader, writer) -> None:
        while True:
            await read_request(reader)
            body = b'{"error": {"message": "bad", "type": "BadRequestError"}}'
            writer.write(
                b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n%s" % (next(answers), len(body), body)
            )

    async with fake_engine(handler) as url:
        http = client()
        for _ in range(2):
            with pytest.raises(UpstreamError) as info:
                await http.open(url, "/v1/completions", b"{}")
            assert info.value.status == 400 and "bad" in info.value.message
            r = await http.open(url, "/v1/completions", b"{}")
            assert r.status == 200
            await r.read()
            r.release()
        assert http.open_count == 1 and http.busy == 0
        await http.close()


async def test_an_idle_connection_closed_by_the_engine_is_retried_on_a_fresh_one() -> None:
    async def handler(reader, writer) -> None:  # answers one request, then drops the socket
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")  # the reuse: closed without an answer
        writer.close()

    async with fake_engine(handler) as url:
        http = client()
        for _ in range(3):
            r = await http.open(url, "/v1/completions", b"{}")
            assert await r.read() == b"ok"
            r.release()
        assert http.open_count == 3 and http.busy == 0
        await http.close()


async def test_a_stream_that_stalls_times_out_with_an_error_and_frees_the_slot() -> None:
    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(EVENT))
        await asyncio.sleep(30)

    async with fake_engine(handler) as url:
        http = client(read=0.3)
        r = await http.open(url, "/v1/chat/completions", b"{}")
        assert await r.first() == EVENT
        got: list[bytes] = []
        with pytest.raises(UpstreamTimeout):
            await r.stream(got.append)
        r.close()
        assert got == [] and http.busy == 0
        await http.close()


async def test_no_answer_at_all_times_out_and_a_refused_port_is_no_engine() -> None:
    async def handler(reader, writer) -> None:
        await asyncio.sleep(30)

    async with fake_engine(handler) as url:
        http = client(read=0.3)
        with pytest.raises(UpstreamTimeout):
            await http.open(url, "/v1/completions", b"{}")
        assert http.busy == 0
    with pytest.raises(NoEngineReady):
        await http.open(url, "/v1/completions", b"{}")  # the server is gone
    assert http.busy == 0
    await http.close()


async def test_garbage_and_a_cut_stream_are_upstream_errors() -> None:
    async def garbage(reader, writer) -> None:
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")

    async def cut(reader, writer) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(EVENT) + chunk(EVENT))
        await writer.drain()
        writer.close()

    http = client()
    async with fake_engine(garbage) as url:
        with pytest.raises(UpstreamError, match="malformed"):
            await http.open(url, "/v1/completions", b"{}")
    async with fake_engine(cut) as url:
        r = await http.open(url, "/v1/completions", b"{}")
        got: list[bytes] = [await r.first()]
        with pytest.raises(UpstreamError, match="closed the connection"):
            await r.stream(got.append)
        r.close()
        assert b"".join(got) == EVENT * 2
    assert http.busy == 0
    await http.close()


async def test_the_pool_limit_makes_callers_wait_then_time_out() -> None:
    release = asyncio.Event()

    async def handler(reader, writer) -> None:
        while True:
            await read_request(reader)
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    async with fake_engine(handler) as url:
        http = client(max_connections=1, pool=0.3)
        first = asyncio.ensure_future(http.open(url, "/v1/completions", b"{}"))
        await asyncio.sleep(0.05)
        with pytest.raises(UpstreamTimeout, match="free in time"):
            await http.open(url, "/v1/completions", b"{}")
        waiting = asyncio.ensure_future(http.open(url, "/v1/completions", b"{}"))
        await asyncio.sleep(0.05)
        release.set()
        r1 = await first
        assert await r1.read() == b"ok"
        r1.release()
        r2 = await waiting  # got the slot the first one gave back
        assert await r2.read() == b"ok"
        r2.release()
        assert http.busy == 0 and not http.waiters
        await http.close()


async def test_the_relay_keeps_order_when_the_client_is_slow() -> None:
    """A send that suspends (the client's socket is full) pauses the engine's socket;
    what arrives meanwhile follows in order, and the usage is still captured."""
    n = 200

    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD)
        for i in range(n):
            writer.write(chunk(b'data: {"choices":[{"delta":{"content":"%d"}}]}\n\n' % i))
            if i % 20 == 0:
                await writer.drain()
        writer.write(chunk(USAGE) + chunk(DONE) + b"0\r\n\r\n")

    sent: list[bytes] = []
    calls = 0

    async def slow_send(message: dict) -> None:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            await asyncio.sleep(0.002)  # suspends, like uvicorn's drain on a full socket
        sent.append(message["body"])

    async with fake_engine(handler) as url:
        http = client()
        r = await http.open(url, "/v1/chat/completions", b"{}")
        first = await r.first()
        outcome = StreamOutcome(started=0.0)
        relay = Relay(r, outcome, drop_usage=True, first=first)
        await relay.pump(slow_send)
        body = b"".join(sent)
        numbers = [int(e.split(b'"content":"')[1].split(b'"')[0]) for e in body.split(b"\n\n")[:-2]]
        assert numbers == list(range(n))
        assert body.endswith(DONE) and b"usage" not in body  # hidden: the client did not ask
        assert outcome.usage == {"prompt_tokens": 3, "completion_tokens": 4}
        assert outcome.done and outcome.error is None
        assert http.busy == 0 and http.open_count == 1
        await http.close()


async def test_a_send_that_fails_closes_the_engine_side() -> None:
    async def handler(reader, writer) -> None:
        await read_request(reader)
        writer.write(SSE_HEAD + chunk(EVENT))
        for _ in range(50):
            await asyncio.sleep(0.01)
            writer.write(chunk(EVENT))

    async def broken_send(message: dict) -> None:
        raise OSError("client socket broke")

    async with fake_engine(handler) as url:
        http = client()
        r = await http.open(url, "/v1/chat/completions", b"{}")
        relay = Relay(r, StreamOutcome(started=0.0), drop_usage=False, first=b"")
        with pytest.raises(OSError, match="client socket broke"):
            await relay.pump(broken_send)
        assert http.busy == 0 and not http.idle
        await http.close()
