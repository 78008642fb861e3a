"""uvicorn's Server with a main loop that sleeps until there is something to do, and an
accept loop that takes every waiting connection at once.

uvicorn's own main loop wakes ten times a second to look at `should_exit`. On the hosts
measured here a wake-up of an idle event loop costs ~0.2 ms of CPU, so those ticks
were half of an idle gateway's CPU (3.7 -> 1.8 ms/s without them, benchmarks/RESULTS.md).
Here the loop wakes once a second (the Date header's resolution) or at once when
`should_exit` is set, by a signal handler or by our own code.

uvloop's listener (libuv since 1.45) accepts one connection per loop iteration. A busy
gateway's iteration takes 10-30 ms, so a burst of new connections (clients reconnecting
together) waited in the kernel's queue for seconds: 512 at once took 5 s to accept.
`BatchListener` accepts up to `ACCEPT_BATCH` per wake-up, as asyncio's own loop does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

log = logging.getLogger("tiergate.server")

ACCEPT_BATCH = 256  # per wake-up: the streams already served are waiting too
ACCEPT_PAUSE_S = 0.1  # after an accept error such as EMFILE, instead of spinning on it


def bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The gateway's port, bound now so that a clash fails at start (it listens later).
    `reuse_port`: each of server.workers binds its own socket to the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class BatchListener:
    """Accepts on `sock` in batches and serves each connection with a protocol from
    `factory`, on uvloop's own transport. Stands in for the asyncio.Server that uvicorn
    keeps in `Server.servers` (`sockets`, `close`, `wait_closed`)."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol]) -> None:
        self.sock = sock
        self.factory = factory
        self.loop = asyncio.get_running_loop()
        self.tcp = sock.family in (socket.AF_INET, socket.AF_INET6)
        self.closed = False

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    def start(self, backlog: int) -> None:
        self.sock.listen(backlog)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: the queue keeps them
                log.warning("accept failed (%s); retrying in %.1f s", exc, ACCEPT_PAUSE_S)
                self.loop.remove_reader(self.sock.fileno())
                self.loop.call_later(ACCEPT_PAUSE_S, self._resume)
                return
            if self.tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The transport exists once the coroutine's first step ran; the task only
            # waits for connection_made.
            task = self.loop.create_task(self.loop.connect_accepted_socket(self.factory, conn))
            task.add_done_callback(_served)

    def _resume(self) -> None:
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()

    async def wait_closed(self) -> None:
        pass  # closing is immediate: nothing to wait for


def _served(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("an accepted connection could not be served: %r", task.exception())


class GatewayServer(uvicorn.Server):
    tick_s = 1.0  # the longest sleep between ticks

    def __init__(self, config: uvicorn.Config) -> None:
        self._nudge: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._exit = value
        if value and self._loop is not None and self._nudge is not None:
            # Thread-safe form: uvicorn sets this from a signal handler.
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._nudge.set)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (lifespan first), then our listeners on `sockets` (default:
        the config's host and port); `[]` listens on nothing (server.front hands over)."""
        if sockets is None:
            sockets = [bind(self.config.host, self.config.port)]
        await super().startup(sockets=[])
        if not self.started:
            return
        config = self.config
        factory = functools.partial(
            config.http_protocol_class,
            config=config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        self.servers = [BatchListener(sock, factory) for sock in sockets]
        for listener in self.servers:
            listener.start(config.backlog)

    async def main_loop(self) -> None:
        self._loop, self._nudge = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        # on_tick refreshes the Date header when counter % 10 == 0: every call here.
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._nudge.wait()


def server_for(
    listener: socket.socket, config: uvicorn.Config, app: Any, settings: Any
) -> tuple[GatewayServer, list[socket.socket], Any]:
    """The server for `listener`, the sockets to serve it on, and the front's link (None
    without `server.front`; else the front owns the listener and hands connections over,
    serving/front, and the caller awaits `link.close()` once serving ends)."""
    if not settings.server.front:
        return GatewayServer(config), [listener], None
    from serving.front.handoff import FrontLink, fronted_server

    link = FrontLink(listener, app.state.metrics)
    return fronted_server(config, app, settings, link), [], link
