"""Messages between the front and the gateway, on a SOCK_SEQPACKET socket pair.

One message per packet (the kernel keeps the boundaries), a 1-byte kind first:
- HAND   front -> gateway: a new connection's first request: the socket (SCM_RIGHTS),
         its id, whether the front counted it against `server.max_in_flight`, and the
         bytes read so far. The gateway keeps its copy of the socket from then on;
- RESUME front -> gateway: the next request on parked connections (id, counted, bytes);
- DONE   gateway -> front: the requests on these connections are answered, and what
         became of each: RETURNED (parked: the gateway stopped reading it and the front
         reads the next request), CLOSED, or KEPT (the gateway serves it to its end: a
         pipelined request or unwritten bytes);
- CLOSE  front -> gateway: a parked connection ended (client gone, idle too long);
- STATS  front -> gateway: refusals since the last STATS, per hot path;
- STOP   gateway -> front: stop accepting, close what is parked, exit.

The slots themselves are not in the messages: the gateway counts the front-counted
requests it has finished in a shared 8-byte counter (`Released`), which the front reads
when it decides, so a slot is free the moment its response is written.

RESUME and DONE carry every entry of one pass of the sender's event loop (`Outbox`):
both processes share one core, and a packet per request would wake the other process,
and switch the core, once per request.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable

HAND, DONE, STATS, STOP, RESUME, CLOSE = 1, 2, 3, 4, 5, 6
RETURNED, CLOSED, KEPT = 0, 1, 2
_HAND = struct.Struct("!BIB")  # kind, connection id, counted
_DONE = struct.Struct("!IB")  # per entry: connection id, disposition
_RESUME = struct.Struct("!IBI")  # per entry: connection id, counted, bytes that follow
_CLOSE = struct.Struct("!BI")  # kind, connection id
_STATS = struct.Struct("!BII")  # kind, refused on chat, refused on completions
MAX_PACKET = 512 * 1024  # a HAND: a 64 KiB head limit plus one read; Outbox flushes at half
_FDS = socket.CMSG_SPACE(array.array("i", [0]).itemsize)


def pair() -> tuple[socket.socket, socket.socket]:
    """(gateway end, front end), with room for the largest packet."""
    ends = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for end in ends:
        end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * MAX_PACKET)
        end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * MAX_PACKET)
    return ends


class Released:
    """A counter in shared memory: front-counted requests the gateway has finished. One
    writer (the gateway); an aligned 8-byte load or store is one instruction on x86-64
    and arm64, so the front never reads a torn value."""

    def __init__(self, fd: int | None = None) -> None:
        if fd is None:
            fd = os.memfd_create("tiergate-front", 0)
            os.ftruncate(fd, mmap.PAGESIZE)
        self.fd = fd
        self.map = mmap.mmap(fd, mmap.PAGESIZE)
        self.cell = ctypes.c_uint64.from_buffer(self.map)

    @property
    def value(self) -> int:
        return self.cell.value

    def add(self) -> None:
        self.cell.value += 1


def send_hand(chan: socket.socket, conn_id: int, counted: bool, data: bytes, fd: int) -> None:
    fds = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
    chan.sendmsg([_HAND.pack(HAND, conn_id, counted), data], fds)


def send_close(chan: socket.socket, conn_id: int) -> None:
    chan.send(_CLOSE.pack(CLOSE, conn_id))


def send_stats(chan: socket.socket, chat: int, completions: int) -> None:
    chan.send(_STATS.pack(STATS, chat, completions))


def send_stop(chan: socket.socket) -> None:
    chan.send(bytes([STOP]))


def done_entry(conn_id: int, disposition: int) -> bytes:
    return _DONE.pack(conn_id, disposition)


def resume_entry(conn_id: int, counted: bool, data: bytes) -> bytes:
    return _RESUME.pack(conn_id, counted, len(data)) + data


class Outbox:
    """Entries of one kind (DONE or RESUME) gathered during a pass of the event loop and
    sent as one packet when the pass ends, or once the first has waited `max_wait_s`:
    a saturated gateway's pass takes 10-20 ms, and a whole pass of DONEs at once would
    hand the front one long burst of work that a refusal then waits behind (RESULTS.md).
    `on_error` hears of a failed send."""

    def __init__(
        self,
        chan: socket.socket,
        kind: int,
        on_error: Callable[[], None],
        max_wait_s: float = 0.001,
    ) -> None:
        self.chan, self.head, self.on_error = chan, bytes([kind]), on_error
        self.max_wait_s = max_wait_s
        self.entries: list[bytes] = []
        self.size = 0
        self.first = 0.0

    def add(self, entry: bytes) -> None:
        if not self.entries:
            asyncio.get_running_loop().call_soon(self.flush)
            self.first = time.monotonic()
        self.entries.append(entry)
        self.size += len(entry)
        if self.size > MAX_PACKET // 2 or time.monotonic() - self.first > self.max_wait_s:
            self.flush()

    def flush(self) -> None:
        if not self.entries:
            return
        entries, self.entries, self.size = self.entries, [], 0
        try:
            self.chan.sendmsg([self.head, *entries])
        except OSError:
            self.on_error()


def decode(packet: bytes, fds: list[int]) -> tuple:
    """One packet as a tuple: (HAND, id, counted, data, fd), (RESUME, [(id, counted,
    data), ...]), (DONE, [(id, disposition), ...]), (CLOSE, id), (STATS, chat,
    completions) or (STOP,). Raises ValueError on anything else."""
    kind = packet[:1]
    if kind == bytes([HAND]) and len(fds) == 1 and len(packet) >= _HAND.size:
        _, conn_id, counted = _HAND.unpack_from(packet)
        return HAND, conn_id, bool(counted), packet[_HAND.size :], fds[0]
    if kind == bytes([RESUME]):
        entries, at = [], 1
        while at < len(packet):
            conn_id, counted, size = _RESUME.unpack_from(packet, at)
            at += _RESUME.size
            if at + size > len(packet):
                raise ValueError("a RESUME entry runs past its packet")
            entries.append((conn_id, bool(counted), packet[at : at + size]))
            at += size
        return RESUME, entries
    if kind == bytes([DONE]) and (len(packet) - 1) % _DONE.size == 0:
        return DONE, [_DONE.unpack_from(packet, at) for at in range(1, len(packet), _DONE.size)]
    if kind == bytes([CLOSE]) and len(packet) == _CLOSE.size:
        return _CLOSE.unpack(packet)
    if kind == bytes([STATS]) and len(packet) == _STATS.size:
        return _STATS.unpack(packet)
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
