"""A response's head leaves with its first body bytes: one write, not two.

uvicorn writes the status line and headers as soon as `http.response.start` is sent and
each body message on its own: an error or a unary answer costs two `send` syscalls and
the client two segments to read, and a stream one more write at its start. On the
request path every write is counted (benchmarks/RESULTS.md). The head is held only where
the body is already in hand, so no byte reaches the client later than before. (The
parser callback's 429 skips uvicorn's `send` altogether: serving/api/admission.py.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
