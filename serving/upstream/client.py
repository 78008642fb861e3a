"""The one shared HTTP client to the engines: keep-alive HTTP/1.1 on asyncio Protocols
(serving/upstream/wire.py), picked by measurement.

benchmarks/RESULTS.md has the side-by-side figures: httpx's pool scans every connection
per request and its stream runs through anyio; aiohttp hands a chunk to the reader through
a StreamReader and a task wake-up; the wire client gives it to the relay from the read
callback, which is what a streamed token needs.

`open` returns only once the engine has answered with a success status, so the
caller can still fail over before a byte reaches the client. Errors come back as
GatewayError subclasses. Idle connections are kept 4 s, less than uvicorn's 5 s
(which vLLM uses), so a connection the engine is about to close is not reused; one
that closes anyway before answering is retried once on a fresh connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Mapping
from urllib.parse import urlsplit

from serving.config import TimeoutSettings
from serving.errors import (
    GatewayError,
    NoEngineReady,
    UpstreamError,
    UpstreamTimeout,
    from_upstream,
)
from serving.upstream.wire import Conn, Response

KEEPALIVE_S = 4.0
Address = tuple[str, int]


class UpstreamClient:
    """One connection pool for every request, probe and scrape to the engines.
    `max_connections` bounds the connections in use at once; past it, callers wait up to
    `timeouts.pool`."""

    def __init__(self, timeouts: TimeoutSettings, max_connections: int) -> None:
        self.timeouts = timeouts
        self.max_connections = max_connections
        self.idle: dict[Address, list[Conn]] = {}
        self.busy = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()
        self.all: set[Conn] = set()
        self._targets: dict[str, tuple[Address, bytes]] = {}  # parsed once per engine URL
        self.open_count = 0  # connections opened, for tests of keep-alive

    async def start(self) -> None:
        pass  # connections open on first use

    async def close(self) -> None:
        for conn in list(self.all):
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()

    def _target(self, url: str) -> tuple[Address, bytes]:
        found = self._targets.get(url)
        if found is None:
            u = urlsplit(url)
            port = u.port or (443 if u.scheme == "https" else 80)
            if u.scheme != "http":
                raise UpstreamError(f"Only http:// engines are supported, not {url!r}.")
            found = self._targets[url] = ((u.hostname or "", port), u.netloc.encode())
        return found

    async def _slot(self) -> None:
        if self.max_connections and self.busy >= self.max_connections:
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(self.timeouts.pool):
                    await waiter
            except BaseException as exc:
                if waiter.done() and not waiter.cancelled():
                    self._wake_next()  # handed a slot as we gave up: pass it on
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
                if isinstance(exc, TimeoutError):
                    raise UpstreamTimeout("No connection to the engines was free in time.") from exc
                raise
        self.busy += 1

    def _wake_next(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _unslot(self) -> None:
        self.busy -= 1
        self._wake_next()

    async def _connect(self, address: Address, url: str) -> Conn:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeouts.connect):
                _, conn = await loop.create_connection(
                    lambda: Conn(self.timeouts.read, self._lost), *address
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(f"Connecting to the engine at {url} timed out.") from exc
        except OSError as exc:
            raise NoEngineReady(f"The engine at {url} is unreachable; retry shortly.") from exc
        self.all.add(conn)
        self.open_count += 1
        return conn

    def _idle_conn(self, address: Address) -> Conn | None:
        pool = self.idle.get(address)
        now = asyncio.get_running_loop().time()
        while pool:
            conn = pool.pop()
            if not conn.closed and now - conn.idle_since < KEEPALIVE_S:
                return conn
            conn.transport.close()
        return None

    def _lost(self, conn: Conn) -> None:
        self.all.discard(conn)

    def _done(self, conn: Conn, reuse: bool, address: Address) -> None:
        self._unslot()
        if reuse:
            conn.parser = None
            conn.idle_since = asyncio.get_running_loop().time()
            self.idle.setdefault(address, []).append(conn)
        elif conn.transport is not None:
            conn.transport.close()

    async def _exchange(self, method: bytes, url: str, path: str, body: bytes, extra: bytes):
        address, host = self._target(url)
        await self._slot()
        try:
            head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%scontent-length: %d\r\n\r\n" % (
                method,
                path.encode(),
                host,
                extra,
                len(body),
            )
            for fresh in (False, True):
                conn = None if fresh else self._idle_conn(address)
                reused = conn is not None
                if conn is None:
                    conn = await self._connect(address, url)
                conn.request(head, body)
                try:
                    await conn.wait(lambda c=conn: c.status != 0)
                except UpstreamError:
                    conn.transport.close()
                    if reused and not conn.answered and not isinstance(conn.error, UpstreamTimeout):
                        continue  # the engine closed an idle connection as we used it
                    raise
                except BaseException:
                    conn.transport.close()
                    raise
                return Response(conn, lambda c, reuse: self._done(c, reuse, address))
        except BaseException:
            self._unslot()
            raise
        raise AssertionError("unreachable")

    async def open(
        self, url: str, path: str, body: bytes, trace: Mapping[str, str] | None = None
    ) -> Response:
        """POST `body` and return the response (body unread) once its status is a success.
        `trace`: headers passed on to the engine (x-request-id, traceparent)."""
        extra = b"content-type: application/json\r\n"
        if trace:
            extra += b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in trace.items())
        response = await self._exchange(b"POST", url, path, body, extra)
        if response.status >= 400:
            try:
                data = await response.read()
            except UpstreamError:
                data = b""
                response.close()
            except BaseException:
                response.close()
                raise
            else:
                response.release()  # read to its end: the connection is kept
            raise from_upstream(response.status, data)
        return response

    async def get(self, url: str, timeout: float) -> tuple[int, bytes] | None:
        """A small GET (health, metrics, models); None if it failed in any way."""
        u = urlsplit(url)
        base = f"{u.scheme}://{u.netloc}"
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        response = None
        try:
            async with asyncio.timeout(timeout):
                response = await self._exchange(b"GET", base, path, b"", b"")
                data = await response.read()
            return response.status, data
        except (GatewayError, TimeoutError):
            return None
        finally:
            if response is not None:
                response.release()  # closed instead when not read to the end
