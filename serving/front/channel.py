"""Messages between the front and the gateway, on a SOCK_SEQPACKET socket pair.

One message per packet (the kernel keeps the boundaries), a 1-byte kind first:
- HAND   front -> gateway: a new connection's first request: the socket (SCM_RIGHTS),
         its id, whether the front counted it against `server.max_in_flight`, and the
         bytes read so far. The gateway keeps its copy of the socket from then on;
- RESUME front -> gateway: the next request on a parked connection (id, counted, bytes);
- DONE   gateway -> front: requests answered, one record each (id, and what became of
         the connection: RETURNED (parked: the gateway stopped reading it and the front
         reads the next request), CLOSED, or KEPT (the gateway serves it to its end: a
         pipelined request or unwritten bytes)). The records of a loop pass go in one
         packet: one wake-up of the front, not one a request;
- CLOSE  front -> gateway: a parked connection ended (client gone, idle too long);
- STATS  front -> gateway: refusals since the last STATS, per hot path (the order of
         the paths the gateway gave the front at start), then the connections paced,
         then the retry-after scale its 429s use now;
- STOP   gateway -> front: stop accepting, close what is parked, exit.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import socket
import struct
from collections.abc import Callable

HAND, DONE, STATS, STOP, RESUME, CLOSE = 1, 2, 3, 4, 5, 6
RETURNED, CLOSED, KEPT = 0, 1, 2
_HAND = struct.Struct("!BIB")  # kind, connection id, counted
_DONE = struct.Struct("!IB")  # after the kind, per record: connection id, disposition
_RESUME = struct.Struct("!BIB")  # kind, connection id, counted
_CLOSE = struct.Struct("!BI")  # kind, connection id
MAX_PACKET = 512 * 1024  # the largest HAND: a 64 KiB head limit plus one read
_FDS = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


def pair() -> tuple[socket.socket, socket.socket]:
    """(gateway end, front end), with room for the largest HAND."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in ends:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PACKET)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_PACKET)
    return ends


def hand(conn_id: int, counted: bool, data: bytes) -> list[bytes]:
    return [_HAND.pack(HAND, conn_id, counted), data]  # sent with the socket's descriptor


def resume(conn_id: int, counted: bool, data: bytes) -> list[bytes]:
    return [_RESUME.pack(RESUME, conn_id, counted), data]


def done(records: list[tuple[int, int]]) -> list[bytes]:
    """(connection id, disposition) records, in the order they happened."""
    return [bytes([DONE]), b"".join(_DONE.pack(*r) for r in records)]


def close(conn_id: int) -> list[bytes]:
    return [_CLOSE.pack(CLOSE, conn_id)]


def stats(counts: list[int]) -> list[bytes]:
    return [bytes([STATS]), struct.pack(f"!{len(counts)}I", *counts)]


def stop() -> list[bytes]:
    return [bytes([STOP])]


class Sender:
    """Sends packets in order and never drops one: when the pair's buffer is full (the
    other process is starved for a while), they wait here until it is writable. A lost
    HAND would lose a request; a lost DONE, a slot. `on_error`: the other end is gone."""

    def __init__(self, chan: socket.socket, on_error: Callable[[], None]) -> None:
        self.chan, self.on_error = chan, on_error
        self.queue: collections.deque[tuple[list[bytes], int | None]] = collections.deque()

    def send(self, parts: list[bytes], fd: int | None = None) -> None:
        if not self.queue:
            try:
                self._send(parts, fd)
                return
            except BlockingIOError:
                asyncio.get_running_loop().add_writer(self.chan.fileno(), self._drain)
            except OSError:
                self.on_error()
                return
        self.queue.append((parts, fd))

    def _send(self, parts: list[bytes], fd: int | None) -> None:
        if fd is None:
            self.chan.sendmsg(parts)
        else:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.chan.sendmsg(parts, rights)

    def _drain(self) -> None:
        while self.queue:
            try:
                self._send(*self.queue[0])
            except BlockingIOError:
                return
            except OSError:
                self.queue.clear()
                self.on_error()
                break
            self.queue.popleft()
        with contextlib.suppress(ValueError, OSError):
            asyncio.get_running_loop().remove_writer(self.chan.fileno())


def decode(packet: bytes, fds: list[int]) -> tuple:
    """One packet as a tuple: (HAND, id, counted, data, fd), (RESUME, id, counted, data),
    (DONE, (id, disposition), ...), (CLOSE, id), (STATS, *counts) or (STOP,).
    Raises ValueError on anything else."""
    kind = packet[:1]
    if kind == bytes([HAND]) and len(fds) == 1 and len(packet) >= _HAND.size:
        _, conn_id, counted = _HAND.unpack_from(packet)
        return HAND, conn_id, bool(counted), packet[_HAND.size :], fds[0]
    if kind == bytes([RESUME]) and len(packet) >= _RESUME.size:
        _, conn_id, counted = _RESUME.unpack_from(packet)
        return RESUME, conn_id, bool(counted), packet[_RESUME.size :]
    if kind == bytes([CLOSE]) and len(packet) == _CLOSE.size:
        return _CLOSE.unpack(packet)
    if kind == bytes([DONE]) and len(packet) > 1 and (len(packet) - 1) % _DONE.size == 0:
        return (DONE, *_DONE.iter_unpack(packet[1:]))
    if kind == bytes([STATS]) and (len(packet) - 1) % 4 == 0:
        return (STATS, *struct.unpack(f"!{(len(packet) - 1) // 4}I", packet[1:]))
    if kind == bytes([STOP]) and len(packet) == 1:
        return (STOP,)
    raise ValueError(f"bad packet from the other end: {packet[:16]!r}")


def receive(chan: socket.socket) -> list[tuple] | None:
    """Every packet waiting (non-blocking), decoded; None once the other end is gone."""
    out = []
    while True:
        try:
            packet, anc, _, _ = chan.recvmsg(MAX_PACKET, _FDS)
        except (BlockingIOError, InterruptedError):
            return out
        except ConnectionError:
            return None
        if not packet:
            return None if not out else out  # EOF: report what came first, None next time
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", data[: len(data) - len(data) % 4]))
        out.append(decode(packet, fds))
