"""The gateway's side of `server.front`: start the front, adopt the connections it hands
over, serve them with uvicorn's protocol, and park each one between requests.

A handed connection is served exactly like one uvicorn accepted (the same protocol
class, admission in the parser callback included), with two differences: a request
the front counted against `server.max_in_flight` is not asked again, and when a
response is written and nothing else is pending, the connection is parked: reading
paused here (the transport stays), the front told, and the front reads the next
request and sends it over (RESUME), so a request costs two small messages, not a new
transport. When anything is pending (a pipelined request, unwritten bytes) the gateway
keeps the connection and serves it to its end, as without a front.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Any

from serving.api.admission import AdmittingProtocol
from serving.api.hotpath import ROUTES, HotPath, wire_head
from serving.front import channel
from serving.metrics import GatewayMetrics

log = logging.getLogger("tiergate.front")

MAX_HEAD_BYTES = 64 * 1024
MAX_RESTARTS = 5  # of the front within a minute
DONE_BATCH = 8  # DONE records sent at once at the most (RESULTS.md, "A front process")
_PATHS = tuple(ROUTES)  # the hot paths the front may refuse, in the STATS message's order


def raw_responses(refusals: list[list[dict]], close: bool) -> list[str]:
    """The gateway's prebuilt 429s (ASGI messages) as HTTP/1.1 bytes, base64 for JSON."""
    out = []
    for start, body in refusals:
        raw = wire_head(start) + (b"connection: close\r\n" if close else b"") + b"\r\n"
        out.append(base64.b64encode(raw + body["body"]).decode())
    return out


class FrontedProtocol(AdmittingProtocol):
    """uvicorn's protocol on a connection the front handed over (serving/front). Between
    requests it is parked: reading paused here, the front reading the next request."""

    refuses_whole = False  # the front refuses at capacity; what it hands, it counted

    def __init__(self, link: FrontLink, conn_id: int, counted: bool, data: bytes, **kw: Any):
        super().__init__(**kw)
        self.link, self.conn_id, self.counted, self.handed = link, conn_id, counted, data
        self.managed = True  # the front holds a copy of the socket

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        data, self.handed = self.handed, b""
        if data:
            self.data_received(data)

    def resume(self, counted: bool, data: bytes) -> None:
        """The front read the next request (`data`, maybe only its start): serve it."""
        self.counted = counted
        self.data_received(data)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def admitted_elsewhere(self) -> bool:
        counted, self.counted = self.counted, False  # the front counted this request
        return counted

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.managed or self.transport.is_closing():
            return  # closing: connection_lost reports it
        if self.pipeline or not self.between or self.transport.get_write_buffer_size():
            self.managed = False  # served here to its end, as without a front
            self.link.report(self.conn_id, channel.KEPT)
            return
        if not self.link.park(self):
            return  # the front is gone: served here to its end
        if self.timeout_keep_alive_task is not None:  # the front times idle connections
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.managed:
            self.managed = False
            self.link.lost(self)
        super().connection_lost(exc)


class FrontLink:
    """Starts the front on `listener`, adopts what it hands over, feeds its refusals to
    the metrics, replaces it if it dies, and stops it (STOP, then wait; killed if it
    does not go)."""

    def __init__(self, listener: socket.socket, metrics: GatewayMetrics) -> None:
        self.listener = listener
        self.metrics = metrics
        self.chan: socket.socket | None = None
        self.proc: subprocess.Popen | None = None
        self.factory: Any = None
        self.parked: dict[int, FrontedProtocol] = {}
        self.out: channel.Sender | None = None
        self.done: list[tuple[int, int]] = []  # DONE records not yet sent
        self.config: dict = {}
        self.server: Any = None
        self.restarts: list[float] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hot: HotPath | None = None
        self.max_in_flight = 0

    def start(self, hot: HotPath, settings: Any, keep_alive_s: float) -> None:
        """Start the front process; it accepts at once (the gateway adopts once attached)."""
        self.listener.listen(2048)
        self.hot, self.max_in_flight = hot, settings.server.max_in_flight
        refusals = hot.refusal_messages("in_flight")
        self.config = {
            "listen_fd": self.listener.fileno(),
            "paths": _PATHS,
            "max_in_flight": settings.server.max_in_flight,
            "max_body_bytes": settings.server.max_body_bytes,
            "max_head_bytes": MAX_HEAD_BYTES,
            "keep_alive_s": keep_alive_s,
            "access_log": settings.server.access_log == "json",
            "max_refusals_s": settings.server.max_refusals_s,
            # every retry-after scale's 429s: the front scales its own (retry_scale.py)
            "scales": list(hot.scales),
            "retry_after_s": hot.retry_after_s,
            "refusal_ms": hot.refusal_ms_by_scale,
            "refusals": [raw_responses(r, close=False) for r in refusals],
            "refusals_close": [raw_responses(r, close=True) for r in refusals],
        }
        self._spawn()

    def _spawn(self) -> None:
        mine, theirs = channel.pair()
        config = self.config | {"channel_fd": theirs.fileno()}
        # In a memfd, not an argument: every scale's 429s reach ~150 KB, past the
        # kernel's 128 KiB for one argument; nothing is left on disk.
        blob = os.memfd_create("tiergate-front-config")
        try:
            with open(blob, "wb", closefd=False) as f:
                f.write(json.dumps(config).encode())
            os.lseek(blob, 0, os.SEEK_SET)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "serving.front.acceptor", str(blob)],
                pass_fds=(self.listener.fileno(), theirs.fileno(), blob),
            )
        finally:
            os.close(blob)
        theirs.close()
        mine.setblocking(False)
        self.chan = mine
        self.out = channel.Sender(mine, self._front_gone)

    def attach(self, server: Any) -> None:
        """Adopt handed connections into `server` (a started uvicorn.Server)."""
        self.loop = asyncio.get_running_loop()
        self.server = server
        self.factory = functools.partial(
            FrontedProtocol,
            config=server.config,
            server_state=server.server_state,
            app_state=server.lifespan.state,
        )
        self.loop.add_reader(self.chan.fileno(), self._from_front)

    def _from_front(self) -> None:
        try:
            messages = channel.receive(self.chan)
        except ValueError:
            log.exception("the front sent a bad message")
            messages = None
        if messages is None:
            self._front_gone()
            return
        for message in messages:
            kind = message[0]
            if kind == channel.RESUME:
                protocol = self.parked.pop(message[1], None)
                if protocol is None:  # closed here meanwhile; the front hears CLOSED
                    continue
                protocol.resume(message[2], message[3])
            elif kind == channel.HAND:
                self._adopt(*message[1:])
            elif kind == channel.CLOSE:
                protocol = self.parked.pop(message[1], None)
                if protocol is not None:
                    protocol.managed = False
                    protocol.transport.close()
            elif kind == channel.STATS:
                *refused, paced, scale = message[1:]
                self.metrics.retry_after_scale.set(scale)
                for path, n in zip(_PATHS, refused, strict=True):
                    if n:
                        self.metrics.admission_refused("in_flight", n)
                        self.metrics.request_done("unknown", path, 429, n)
                if paced:
                    self.metrics.paced.inc(paced)

    def _front_gone(self) -> None:
        """The front died (it is never stopped but by us): every connection it handed
        over is served here to its end, and a new front takes the port. After
        MAX_RESTARTS within a minute the gateway stops instead (its supervisor - the
        shell, Kubernetes - sees it)."""
        if self.factory is None:
            return  # stopping, or gone already
        factory = self.factory
        self._detach()
        for protocol in list(self.server.server_state.connections):
            if isinstance(protocol, FrontedProtocol):
                protocol.managed = False  # no front to park with: served here as uvicorn's
        now = time.monotonic()
        self.restarts = [t for t in self.restarts if now - t < 60] + [now]
        if len(self.restarts) > MAX_RESTARTS:
            log.error("the front process keeps dying; stopping the gateway")
            self.server.should_exit = True
            return
        log.error("the front process is gone; starting a new one")
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        if self.chan is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_writer(self.chan.fileno())
            self.chan.close()
        self._spawn()
        self.factory = factory
        self.loop.add_reader(self.chan.fileno(), self._from_front)

    def _adopt(self, conn_id: int, counted: bool, data: bytes, fd: int) -> None:
        sock = socket.socket(fileno=fd)
        if self.factory is None:  # stopping
            sock.close()
            return
        protocol = self.factory(self, conn_id, counted, data)
        # The transport exists once the coroutine's first step ran; its task only waits
        # for connection_made, which feeds the handed bytes to the parser.
        task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: protocol, sock))
        task.add_done_callback(_adopted)

    def park(self, protocol: FrontedProtocol) -> bool:
        """The response is written and nothing is pending: the front reads what comes next."""
        if not self.report(protocol.conn_id, channel.RETURNED) or not protocol.managed:
            protocol.managed = False  # (the send found the front gone: a new one knows not)
            return False
        self.parked[protocol.conn_id] = protocol
        return True

    def lost(self, protocol: FrontedProtocol) -> None:
        self.parked.pop(protocol.conn_id, None)
        self.report(protocol.conn_id, channel.CLOSED)

    def report(self, conn_id: int, disposition: int) -> bool:
        """Queue a DONE record; a loop pass's records leave together (`_send_done`), as
        each packet wakes the front, which shares the gateway's core. The front counts a
        request until its record comes: near `server.max_in_flight` every record goes
        at once, so that the front never refuses for a slot that is free."""
        if self.out is None or self.factory is None:
            return False
        self.done.append((conn_id, disposition))
        if len(self.done) >= DONE_BATCH or (
            self.max_in_flight
            and self.hot is not None
            and self.hot.in_flight + len(self.done) + DONE_BATCH >= self.max_in_flight
        ):
            self._send_done()  # under overload every record: no callback scheduled for it
        elif len(self.done) == 1:
            self.loop.call_soon(self._send_done)
        return True

    def _send_done(self) -> None:
        records, self.done = self.done, []
        if records and self.out is not None and self.factory is not None:
            self.out.send(channel.done(records))

    def _detach(self) -> None:
        """No more messages either way. Parked connections cannot be read by anyone now:
        they are closed (their clients reconnect)."""
        if self.chan is not None and self.loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.chan.fileno())
        self.factory = None
        self.done = []  # for a front that is gone; a new one knows none of these ids
        parked, self.parked = self.parked, {}
        for protocol in parked.values():
            protocol.managed = False
            protocol.transport.close()

    def stop(self) -> None:
        """Stop accepting: the front closes the port and what it parked, then exits."""
        if self.out is not None and self.factory is not None:
            self._send_done()
            self.out.send(channel.stop())
        self._detach()

    async def close(self, timeout: float = 5.0) -> None:
        """Wait for the front to exit (killed after `timeout`), then close our end."""
        self.stop()
        if self.proc is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)
            except TimeoutError:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        if self.chan is not None:
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_writer(self.chan.fileno())
            self.chan.close()
            self.chan = None


def _adopted(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a handed connection could not be adopted: %r", task.exception())


def fronted_server(config: Any, app: Any, settings: Any, link: FrontLink) -> Any:
    """A GatewayServer that listens on nothing itself: after start-up the front starts
    and hands it connections; shutdown stops the front first (no new requests)."""
    from serving.api.server import GatewayServer

    class FrontedServer(GatewayServer):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=[])
            if self.should_exit:
                return
            link.start(app.state.hot, settings, config.timeout_keep_alive)
            link.attach(self)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            link.stop()
            await super().shutdown(sockets)

    return FrontedServer(config)
