"""A FAKE engine that costs its core as little as Python can, for the gateway's capacity
and overload runs (benchmarks/studies/gateway_capacity.py), where it shares a core with
the load generator and must not be what limits.

Same bytes on the wire as benchmarks/studies/fake_server.py (HTTP/1.1 keep-alive, a
chunked SSE body: `--events` chat events `--gap-ms` apart, then usage and [DONE]), but
no ASGI server and no timer or task per event: an httptools Protocol per connection,
and one clock that ticks every millisecond and writes the due event of every stream in
that tick's slot. A stream's events are thus `--gap-ms` apart to the millisecond, the
first one a gap after its request.

    python -m benchmarks.studies.fake_stream --port 9100 --events 16 --gap-ms 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

import httptools
import uvloop

PIECE = b'data: {"choices":[{"index":0,"delta":{"content":" x"}}]}\n\n'
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def plain(status: bytes, body: bytes) -> bytes:
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


class Clock:
    """Slots of streams, one per millisecond of the gap: each tick serves one slot."""

    def __init__(self, events: int, gap_ms: int) -> None:
        self.events = events
        self.slots: list[dict[Stream, int]] = [{} for _ in range(max(1, gap_ms))]
        self.tick = 0
        usage = {"prompt_tokens": 16, "completion_tokens": events, "total_tokens": 16 + events}
        tail = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
        self.event = chunk(PIECE)
        self.last = chunk(PIECE) + chunk(tail + b"data: [DONE]\n\n") + b"0\r\n\r\n"

    def add(self, stream: Stream) -> None:
        # the slot just served: the first event comes one gap after the request, as prefill
        self.slots[self.tick % len(self.slots)][stream] = self.events

    def drop(self, stream: Stream) -> None:
        for slot in self.slots:
            slot.pop(stream, None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            self.tick += 1
            slot = self.slots[self.tick % len(self.slots)]
            done = []
            for stream, left in slot.items():
                if left > 1:
                    slot[stream] = left - 1
                    stream.transport.write(self.event)
                else:
                    done.append(stream)
                    stream.transport.write(self.last)
            for stream in done:
                del slot[stream]
            # absolute deadlines: a late tick does not shift the ones after it
            await asyncio.sleep(max(0.0, start + self.tick / 1000 - loop.time()))


class Stream(asyncio.Protocol):
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.clock.drop(self)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(plain(b"400 Bad Request", b"{}"))
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        path = self.url.split(b"?", 1)[0]
        if path in (b"/v1/chat/completions", b"/v1/completions"):
            self.transport.write(HEAD)
            self.clock.add(self)
        elif path == b"/v1/models":
            models = b'{"object":"list","data":[{"id":"fake","object":"model"}]}'
            self.transport.write(plain(b"200 OK", models))
        elif path in (b"/health", b"/metrics"):
            self.transport.write(plain(b"200 OK", b""))
        else:
            self.transport.write(plain(b"404 Not Found", b'{"error":{"message":"not found"}}'))
        self.url = b""


async def serve(host: str, port: int, events: int, gap_ms: int) -> None:
    loop = asyncio.get_running_loop()
    clock = Clock(events, gap_ms)
    server = await loop.create_server(lambda: Stream(clock), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    ticker = asyncio.ensure_future(clock.run())
    try:
        await stop.wait()
    finally:
        ticker.cancel()
        server.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--events", type=int, default=16)
    p.add_argument("--gap-ms", type=int, default=5)
    a = p.parse_args(argv)
    uvloop.run(serve(a.host, a.port, a.events, a.gap_ms))


if __name__ == "__main__":
    main()
