"""A request head read by hand: the front's, and the gateway's refusals' (serving/api/admission.py).

Standard library only: the front process imports it (serving/front/acceptor.py). It
reads the few things those two act on and raises ValueError for anything unusual, which
then goes to uvicorn's full parser.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Head:
    """What the front, and the gateway's refusals, need of a request head."""

    method: bytes
    path: bytes
    size: int  # bytes of the head, the blank line included
    content_length: int
    chunked: bool
    expect: bool
    close: bool  # the connection ends after this request
    version: bytes = b"HTTP/1.1"


def parse_head(buf: bytes) -> Head | None:
    """The head at the start of `buf`, or None while it is incomplete. ValueError when it
    is not a plain HTTP/1.x head: the front then hands it to the gateway, which answers."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError("not an HTTP/1.x request line")
    method, target, version = parts
    length, chunked, expect, tokens = None, False, False, set()
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError("a header line without a colon")
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length":
            if length is not None or not value.isdigit():
                raise ValueError("a bad or repeated content-length")
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = True
        elif name == b"expect":
            expect = True
        elif name == b"connection":
            tokens |= {t.strip().lower() for t in value.split(b",")}
    close = b"close" in tokens or (version == b"HTTP/1.0" and b"keep-alive" not in tokens)
    path = target.partition(b"?")[0]
    return Head(method, path, end + 4, length or 0, chunked, expect, close, version)
