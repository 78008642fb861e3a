"""A second yardstick, not a product: a relay that moves each streamed event with no task
wake-up. The engine's socket is an asyncio Protocol parsed by httptools; each body chunk it
yields is written straight to the client from the read callback.

--server asgi: the client side is uvicorn (bare ASGI), and the ASGI `send` coroutine is
run to completion inside the read callback (uvicorn's send does not suspend unless the
client's socket is paused, when a task finishes it).
--server raw: the client side is an httptools Protocol too (HTTP/1.1, keep-alive,
chunked responses): the least Python can do per event.

    python -m benchmarks.studies.raw_relay --port 9300 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from urllib.parse import urlsplit

import httptools
import uvloop

from benchmarks.studies.fake_server import read_all, run_bare

_tasks: set[asyncio.Future] = set()  # held until done (the loop keeps weak references)


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the engine; the callbacks go to the current exchange."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.on_head: Callable[[int, bytes], None] | None = None
        self.on_chunk: Callable[[bytes], None] | None = None
        self.on_end: Callable[[], None] | None = None
        self.ctype = b"application/json"

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def connection_lost(self, exc) -> None:
        self.pool.discard(self)
        if self.on_end is not None:
            self.on_end()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.ctype = value

    def on_headers_complete(self) -> None:
        self.on_head(self.parser.get_status_code(), self.ctype)

    def on_body(self, body: bytes) -> None:
        self.on_chunk(body)

    def on_message_complete(self) -> None:
        end, self.on_end = self.on_end, None
        self.parser = httptools.HttpResponseParser(self)
        self.pool.release(self)
        end()

    def request(self, path: bytes, body: bytes, on_head, on_chunk, on_end) -> None:
        self.on_head, self.on_chunk, self.on_end = on_head, on_chunk, on_end
        self.transport.write(
            b"POST %s HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (path, self.pool.host, len(body), body)
        )


class Pool:
    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.addr = (u.hostname, u.port)
        self.host = u.netloc.encode()
        self.idle: list[Upstream] = []

    async def get(self) -> Upstream:
        if self.idle:
            return self.idle.pop()
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: Upstream(self), *self.addr)
        return proto

    def release(self, conn: Upstream) -> None:
        self.idle.append(conn)

    def discard(self, conn: Upstream) -> None:
        if conn in self.idle:
            self.idle.remove(conn)


def drive(coro) -> None:
    """Run an ASGI send() to its end now; if it suspends (client paused), a task ends it."""
    try:
        fut = coro.send(None)
    except StopIteration:
        return

    async def finish(fut):
        value = None
        while True:
            value = await fut
            try:
                fut = coro.send(value)
            except StopIteration:
                return

    _tasks.add(task := asyncio.ensure_future(finish(fut)))
    task.add_done_callback(_tasks.discard)


def build_asgi(upstream: str):
    pool = Pool(upstream)

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = await read_all(receive)
        conn = await pool.get()
        done = asyncio.get_running_loop().create_future()

        def head(status: int, ctype: bytes) -> None:
            drive(
                send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [(b"content-type", ctype)],
                    }
                )
            )

        def chunk(data: bytes) -> None:
            drive(send({"type": "http.response.body", "body": data, "more_body": True}))

        def end() -> None:
            if not done.done():
                done.set_result(None)

        conn.request(scope["path"].encode(), body, head, chunk, end)
        await done
        await send({"type": "http.response.body", "body": b""})

    return app


class Client(asyncio.Protocol):
    """The client side, HTTP/1.1 with keep-alive; responses are chunked."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body, self.body = b"".join(self.body), []
        _tasks.add(task := asyncio.ensure_future(self.relay(self.url, body)))
        task.add_done_callback(_tasks.discard)

    async def relay(self, path: bytes, body: bytes) -> None:
        conn = await self.pool.get()
        w = self.transport.write

        def head(status: int, ctype: bytes) -> None:
            w(
                b"HTTP/1.1 %d OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n\r\n"
                % (status, ctype)
            )

        def chunk(data: bytes) -> None:
            w(b"%x\r\n%s\r\n" % (len(data), data))

        def end() -> None:
            w(b"0\r\n\r\n")

        conn.request(path, body, head, chunk, end)


def serve_raw(upstream: str, port: int) -> None:
    async def main() -> None:
        pool = Pool(upstream)
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Client(pool), "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=9300)
    p.add_argument("--upstream", required=True)
    p.add_argument("--server", choices=["asgi", "raw"], default="asgi")
    a = p.parse_args(argv)
    if a.server == "raw":
        serve_raw(a.upstream.rstrip("/"), a.port)
    else:
        run_bare(build_asgi(a.upstream.rstrip("/")), "127.0.0.1", a.port)


if __name__ == "__main__":
    main()
