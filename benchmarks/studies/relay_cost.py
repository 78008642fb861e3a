"""The Python cost of relaying one streamed token event, in isolation.

Two steps of the hot path, each timed on the real objects with FAKE sockets (no
syscalls): the engine socket's read callback (`Conn.data_received`: httptools parses
one chunk and hands its body to the sink), and the relay's sink into uvicorn
(`Relay._chunk`), by the ASGI `send` and by the direct chunk writer
(serving/api/coalesce.py). What the syscalls and the loop add is measured under load
in benchmarks/studies/overhead.py.

    python -m benchmarks.studies.relay_cost --out benchmarks/out/relay_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import timeit
from pathlib import Path

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from benchmarks.studies.gateway_capacity import run_meta
from serving.api.coalesce import chunk_writer
from serving.upstream.stream import Relay, StreamOutcome
from serving.upstream.wire import Conn

# One token event as vLLM streams a completion.
EVENT = (
    b'data: {"id":"cmpl-0","object":"text_completion","created":1795767038,'
    b'"model":"smollm2-135m-instruct","choices":[{"index":0,"text":" word",'
    b'"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
)


class FakeTransport:
    """A socket that takes every write and sends nothing (a FAKE)."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: object) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class FakeResponse:
    """The engine side of a relay (a FAKE): never paused here."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...


def _cycle() -> RequestResponseCycle:
    """uvicorn's own cycle for a POST whose chunked response has started."""
    t = FakeTransport()
    log = logging.getLogger("relay_cost")
    cycle = RequestResponseCycle(
        {"type": "http", "method": "POST"}, t, FlowControl(t), log, log, False, [],
        asyncio.Event(), False, True, lambda: None,
    )  # fmt: skip
    cycle.response_started, cycle.chunked_encoding = True, True
    return cycle


async def measure(n: int, repeats: int) -> dict[str, float]:
    """Median µs per event of each step over `repeats` runs of `n` events."""

    def per_event(fn) -> float:
        return statistics.median(timeit.repeat(fn, number=n, repeat=repeats)) / n * 1e6

    conn = Conn(300.0, lambda c: None)
    conn.connection_made(FakeTransport())
    conn.request(b"POST /v1/completions HTTP/1.1\r\n\r\n", b"")
    conn.data_received(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    bodies: list[bytes] = []
    conn.sink = bodies.append
    frame = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
    read = per_event(lambda: (conn.data_received(frame), bodies.clear()))
    conn.timer.cancel()

    out = {"read_callback_us": read}
    for name, direct in (("relay_by_send_us", False), ("relay_by_chunk_writer_us", True)):
        cycle = _cycle()
        relay = Relay(FakeResponse(), StreamOutcome(started=0.0), drop_usage=False, first=b"")
        relay.send = cycle.send
        relay.write = chunk_writer(cycle.send) if direct else None
        out[name] = per_event(lambda relay=relay: relay._chunk(EVENT))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    result = asyncio.run(measure(a.events, a.repeats))
    for k, v in result.items():
        print(f"{k.removesuffix('_us')}: {v:.2f} µs per event")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**run_meta("relay_cost", argv), **result}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
