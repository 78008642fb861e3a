"""The front process: accepts, parks idle keep-alive connections, refuses at capacity,
and hands every other request to the gateway with its socket (serving/front/__init__.py).

It imports the standard library and uvloop only (no FastAPI, no pydantic): it starts
in ~100 ms and its own cost per request is a recv, a head parse and one sendmsg.
Run by the gateway (`handoff.FrontLink`), never by hand: `python -m
serving.front.acceptor CONFIG_FD` (a memfd holding the JSON), with the listening
socket and its end of the pair passed as file descriptors too.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from serving.api.head import Head, parse_head
from serving.api.retry_scale import RetryScale
from serving.front import channel
from serving.router.breaker import RefusalBudget


@dataclass(slots=True)
class Conn:
    id: int
    sock: socket.socket
    buf: bytes = b""
    lent: bool = False  # the gateway is serving a request on it
    counted: bool = False  # ... and that request counts against max_in_flight
    known: bool = False  # the gateway holds a copy of the socket (after the first HAND)
    idle_since: float = 0.0
    paced: bool = False  # not read until its retry-after-ms passed (a refusal storm)


class Front:
    def __init__(self, config: dict, listener: socket.socket, chan: socket.socket) -> None:
        self.loop = asyncio.get_running_loop()
        self.listener = listener
        self.chan = chan
        self.max_in_flight = config["max_in_flight"]  # 0: never refuse here
        self.max_body = config["max_body_bytes"]
        self.max_head = config["max_head_bytes"]
        self.keep_alive_s = config["keep_alive_s"]
        self.access_log = config["access_log"]
        # per retry-after scale, the 429s and each one's retry-after-ms, in seconds
        self.refusals, self.refusals_close = (
            [[base64.b64decode(r) for r in scale] for scale in config[key]]
            for key in ("refusals", "refusals_close")
        )
        self.refusal_s = [[ms / 1000 for ms in scale] for scale in config["refusal_ms"]]
        scales = tuple(config["scales"])
        self.scale = RetryScale(scales, config["retry_after_s"], self.max_in_flight)
        self.budget = RefusalBudget(config["max_refusals_s"])
        self.turn = 0
        self.conns: dict[int, Conn] = {}
        self.next_id = 1
        self.counted = 0  # hot-path requests handed and not yet answered
        # the hot paths (serving/api/hotpath.ROUTES, from the gateway): refusals per path
        self.refused = dict.fromkeys((p.encode() for p in config["paths"]), 0)
        self.paced = 0  # connections paced since the last STATS
        self.stopped = asyncio.Event()
        self.out = channel.Sender(chan, self.stopped.set)

    async def run(self) -> None:
        self.listener.setblocking(False)
        self.chan.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._accept)
        self.loop.add_reader(self.chan.fileno(), self._from_gateway)
        sweeper = asyncio.ensure_future(self._sweep())
        try:
            await self.stopped.wait()
        finally:
            sweeper.cancel()
            self._close_all()

    # -- clients
    def _accept(self) -> None:
        for _ in range(256):  # a bounded batch: the gateway's messages are waiting too
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: try again on the next wake-up
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self.next_id, sock, idle_since=time.monotonic())
            self.next_id = self.next_id % 0xFFFFFFFF + 1
            self.conns[conn.id] = conn
            self.loop.add_reader(sock.fileno(), self._readable, conn)

    def _readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._serve(conn)

    def _serve(self, conn: Conn) -> None:
        while conn.buf:
            try:
                head = parse_head(conn.buf)
            except ValueError:
                self._hand(conn, counted=False)  # the gateway's parser answers it
                return
            if head is None:
                if len(conn.buf) > self.max_head:
                    self._hand(conn, counted=False)
                return
            hot = head.method == b"POST" and head.path in self.refused
            if not hot:
                self._hand(conn, counted=False)
                return
            full = self.max_in_flight and self.counted >= self.max_in_flight
            plain = not (head.chunked or head.expect) and head.content_length <= self.max_body
            if not (full and plain):
                self._hand(conn, counted=True)
                return
            need = head.size + head.content_length
            if len(conn.buf) < need:
                return  # the body is still coming; it is read and dropped
            conn.buf = conn.buf[need:]
            self._refuse(conn, head)
            if head.close or conn.sock.fileno() < 0:
                self._close(conn)
                return
            if conn.paced:
                return  # what else came is read after the wait
        conn.idle_since = time.monotonic()

    def _refuse(self, conn: Conn, head: Head) -> None:
        self.turn = (self.turn + 7) % len(self.refusals[0])  # 7 is prime to 32: all in turn
        self.scale.refused(time.monotonic())
        answer = (self.refusals_close if head.close else self.refusals)[self.scale.at][self.turn]
        self.refused[head.path] += 1
        if self.access_log:  # the gateway's line (serving/api/access_log.py), by the front
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
            line = {"time": f"{stamp},{int(now % 1 * 1000):03d}", "message": "request"}
            line |= {"request_id": os.urandom(16).hex(), "path": head.path.decode(), "status": 429}
            print(json.dumps(line | {"error": "rate_limit_exceeded", "by": "front"}), flush=True)
        try:
            sent = conn.sock.send(answer)
        except OSError:
            sent = -1
        if sent != len(answer):  # a client that does not read 300 bytes: let it go
            self._close(conn)
        elif not self.budget.take(time.monotonic()):
            # A refusal storm (clients that re-send at once): this connection's next
            # request waits, unread, for the retry-after-ms it was just given.
            self.loop.remove_reader(conn.sock.fileno())
            conn.paced, conn.idle_since = True, time.monotonic()
            self.paced += 1
            self.loop.call_later(self.refusal_s[self.scale.at][self.turn], self._unpace, conn)

    def _unpace(self, conn: Conn) -> None:
        conn.paced = False
        if self.conns.get(conn.id) is conn and not conn.lent:
            conn.idle_since = time.monotonic()
            self.loop.add_reader(conn.sock.fileno(), self._readable, conn)

    def _hand(self, conn: Conn, counted: bool) -> None:
        self.loop.remove_reader(conn.sock.fileno())
        if conn.known:
            self.out.send(channel.resume(conn.id, counted, conn.buf))
        else:
            self.out.send(channel.hand(conn.id, counted, conn.buf), conn.sock.fileno())
        conn.buf, conn.lent, conn.known, conn.counted = b"", True, True, counted
        self.counted += counted

    def _close(self, conn: Conn) -> None:
        self.conns.pop(conn.id, None)
        if conn.sock.fileno() < 0:
            return
        if not conn.lent:
            self.loop.remove_reader(conn.sock.fileno())
            if conn.known:  # parked: the gateway's paused copy must go too
                self.out.send(channel.close(conn.id))
        conn.sock.close()  # while lent, the gateway's copy keeps the connection open

    def _close_all(self) -> None:
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        for conn in list(self.conns.values()):
            self._close(conn)

    # -- the gateway
    def _from_gateway(self) -> None:
        try:
            messages = channel.receive(self.chan)
        except ValueError:
            messages = None
        if messages is None:  # the gateway is gone: nothing here can be served
            self.stopped.set()
            return
        for message in messages:
            if message[0] == channel.DONE:
                for conn_id, disposition in message[1:]:
                    self._done(conn_id, disposition)
            elif message[0] == channel.STOP:
                self.stopped.set()

    def _done(self, conn_id: int, disposition: int) -> None:
        conn = self.conns.get(conn_id)
        if conn is None:
            return
        self.counted -= conn.counted
        lent, conn.lent, conn.counted = conn.lent, False, False
        if disposition != channel.RETURNED:
            conn.known = False  # CLOSED: its copy is closed; KEPT: it serves on alone
            self._close(conn)
        elif lent:  # parked: the gateway stopped reading it; the next request is ours
            conn.idle_since = time.monotonic()
            self.loop.add_reader(conn.sock.fileno(), self._readable, conn)

    async def _sweep(self) -> None:
        """Once a second: refusals (and the retry-after scale) to the gateway's metrics,
        idle connections closed."""
        while True:
            await asyncio.sleep(1.0)
            if any(self.refused.values()) or self.paced:
                scale = self.scale.scales[self.scale.at]
                self.out.send(channel.stats([*self.refused.values(), self.paced, scale]))
                self.refused = dict.fromkeys(self.refused, 0)
                self.paced = 0
            cutoff = time.monotonic() - self.keep_alive_s
            for conn in [c for c in self.conns.values() if not c.lent and c.idle_since < cutoff]:
                self._close(conn)


def main(argv: list[str]) -> int:
    with open(int(argv[0]), "rb") as blob:  # a memfd the gateway wrote (handoff._spawn)
        config = json.loads(blob.read())
    listener = socket.socket(fileno=config["listen_fd"])
    chan = socket.socket(fileno=config["channel_fd"])
    # The gateway leads shutdown (it sends STOP, or its end closes): Ctrl-C reaches the
    # whole process group, and the front must keep serving while the gateway drains.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    async def run() -> None:
        await Front(config, listener, chan).run()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        asyncio.run(run())
    else:
        uvloop.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
