"""HTTP/1.1 to the engines on an asyncio Protocol, parsed by httptools (uvicorn's parser).

Why not a general client: a streamed token is one small chunk from the engine, and a
client library hands each one to the reader through a buffer and a task wake-up. Here
the parser's body callback gives the chunk to a sink at once, from the socket's read
callback, so relaying an event costs one parse and one write (benchmarks/RESULTS.md,
"A relay with no wake-up per event": 19 against 28-36 ms of CPU per 1,000 events).

One `Conn` is one keep-alive connection; one `Response` is one exchange on it, so a late
`close()` from a finished request can never touch the connection's next user.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from serving.errors import GatewayError, UpstreamError, UpstreamTimeout


class Conn(asyncio.Protocol):
    """One connection to an engine. The pool hands it to one exchange at a time."""

    def __init__(self, read_timeout: float, on_lost: Callable[[Conn], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.read_timeout = read_timeout
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.closed = False
        self.idle_since = 0.0
        self.answered = False  # any byte of the current answer came
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.keep_alive = False
        self.chunks: list[bytes] = []
        self.batch: list[bytes] = []  # body chunks of one read, for the sink
        self.sink: Callable[[bytes], None] | None = None
        self.complete = False
        self.error: GatewayError | None = None
        self.waiter: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # nothing asked: a stray byte makes the connection unusable
            self.transport.close()
            return
        self.last = self.loop.time()
        self.answered = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._flush()
            self.fail(UpstreamError(f"The engine sent a malformed response: {exc}"))
            return
        self._flush()

    def _flush(self) -> None:
        """One sink call per socket read: events that came together (a busy loop reads
        several per stream) cost one client write, not one each."""
        batch = self.batch
        if batch:
            self.batch = []
            self.sink(batch[0] if len(batch) == 1 else b"".join(batch))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.on_lost(self)
        if self.parser is not None and not self.complete:
            self.fail(UpstreamError("The engine closed the connection mid-response."))

    # -- httptools callbacks
    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # reset once the message ends
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.sink is not None:
            self.batch.append(body)
        else:
            self.chunks.append(body)
            self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        if self.timer is not None:
            self.timer.cancel()
        self._wake()

    # -- the exchange
    def request(self, head: bytes, body: bytes) -> None:
        self._reset()
        self.answered = False
        self.parser = httptools.HttpResponseParser(self)
        self.transport.writelines((head, body))  # one writev, no copy of the body
        self.last = self.loop.time()
        self.timer = self.loop.call_at(self.last + self.read_timeout, self._check)

    def _check(self) -> None:
        if self.complete or self.error is not None:
            return
        due = self.last + self.read_timeout
        if self.loop.time() >= due:
            self.fail(UpstreamTimeout(f"The engine sent nothing for {self.read_timeout:g}s."))
        else:
            self.timer = self.loop.call_at(due, self._check)

    def fail(self, error: GatewayError) -> None:
        if self.error is None and not self.complete:
            self.error = error
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None:
            self.transport.close()
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, ready: Callable[[], bool]) -> None:
        while not ready() and self.error is None and not self.complete:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        if self.error is not None and not ready():
            raise self.error

    def reusable(self) -> bool:
        return self.complete and self.error is None and not self.closed and self.keep_alive


class Response:
    """One answer from an engine. `status` is known; the body is read with `first`,
    `read` or `stream`; then `release` (read to the end) or `close` (abort)."""

    __slots__ = ("conn", "done", "status")

    def __init__(self, conn: Conn, done: Callable[[Conn, bool], None]) -> None:
        self.conn: Conn | None = conn
        self.status = conn.status
        self.done = done

    def _conn(self) -> Conn:
        if self.conn is None:
            raise UpstreamError("The engine's answer was already closed.")
        return self.conn

    async def first(self) -> bytes:
        """The first body bytes (b"" for an empty body); the caller may still fail over."""
        c = self._conn()
        await c.wait(lambda: bool(c.chunks))
        out, c.chunks = b"".join(c.chunks), []
        return out

    async def read(self) -> bytes:
        c = self._conn()
        await c.wait(lambda: c.complete)
        out, c.chunks = b"".join(c.chunks), []
        return out

    async def stream(self, sink: Callable[[bytes], None]) -> None:
        """Hand every further chunk to `sink` as the socket gives it, from the read
        callback (no task wake-up per chunk); return at the end, raise on a failure."""
        c = self._conn()
        pending, c.chunks = c.chunks, []
        c.sink = sink
        for chunk in pending:
            sink(chunk)
        await c.wait(lambda: c.complete)

    def pause(self) -> None:
        """Stop reading the engine (the client is slow); TCP then slows the engine."""
        if self.conn is not None and not self.conn.closed:
            self.conn.transport.pause_reading()

    def resume(self) -> None:
        if self.conn is not None and not self.conn.closed:
            self.conn.transport.resume_reading()

    def release(self) -> None:
        """Give the connection back: kept if it was read to the end, else closed."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.done(conn, conn.reusable())

    def close(self) -> None:
        """Abort: the engine sees the connection close (vLLM aborts the request)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            if not conn.complete:
                conn.fail(UpstreamError("The answer was closed before its end."))
            self.done(conn, False)
