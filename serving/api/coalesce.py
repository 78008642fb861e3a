"""uvicorn's write path with less work: a response's head leaves with its first body
bytes (one write, not two), and a stream's middle chunks skip the ASGI `send`.

uvicorn writes the status line and headers as soon as `http.response.start` is sent and
each body message on its own: an error or a unary answer costs two `send` syscalls and
the client two segments to read, and a stream one more write at its start. On the
request path every write is counted (benchmarks/RESULTS.md). The head is held only where
the body is already in hand, so no byte reaches the client later than before. (The
parser callback's 429 skips uvicorn's `send` altogether: serving/api/admission.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from uvicorn.protocols.http.httptools_impl import RequestResponseCycle


class OneWrite:
    """Stands in for a cycle's transport: the first write (the head) waits for the next."""

    __slots__ = ("head", "transport")

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.head: bytes | None = None  # None: nothing written yet

    def write(self, data: bytes) -> None:
        if self.head is None:
            self.head = data
        else:
            self.transport.write(self.head + data)
            self.head = b""

    def flush(self) -> None:
        if self.head:
            self.transport.write(self.head)
            self.head = b""

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


@contextlib.contextmanager
def head_with_body(cycle: Any) -> Iterator[None]:
    """While inside, the head uvicorn writes for `cycle` waits for the body's first write.
    `cycle` is uvicorn's RequestResponseCycle (or its bound `send`); under another server
    this does nothing."""
    cycle = getattr(cycle, "__self__", cycle)
    if not isinstance(cycle, RequestResponseCycle):
        yield
        return
    transport = cycle.transport
    shim = cycle.transport = OneWrite(transport)
    try:
        yield
    finally:
        cycle.transport = transport
        shim.flush()  # a head that no body followed (an empty first chunk)


def chunk_writer(send: Any) -> Callable[[bytes], bool] | None:
    """A writer of a streamed response's middle chunks straight to uvicorn's transport,
    framed as uvicorn frames them, or None under another server. Per token event this
    skips a message dict, a coroutine and uvicorn's checks (benchmarks/RESULTS.md,
    "CPU per streamed token"). It says no (False) when `send` must do the work: the client's socket
    is full (send waits for it) or the response is not a started chunked one. A chunk
    for a client that left is dropped, as `send` drops it."""
    cycle = getattr(send, "__self__", None)
    if not isinstance(cycle, RequestResponseCycle):
        return None

    def write(body: bytes) -> bool:
        if cycle.disconnected:
            return True
        if cycle.flow.write_paused or not cycle.chunked_encoding or cycle.response_complete:
            return False
        cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    return write
