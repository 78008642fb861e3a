"""The gateway's listener takes a burst of new connections at once, even while its loop
is busy (serving/api/server.py, BatchListener)."""

from __future__ import annotations

import asyncio
import socket
import time

import uvicorn
import uvloop

from serving.api.server import GatewayServer

CLIENTS = 100


async def _app(scope, receive, send) -> None:  # a bare ASGI app; lifespan is off
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _clients(port: int) -> list[bytes]:
    """Connect every client first (the kernel completes the handshakes), then ask."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=60) for _ in range(CLIENTS)]
    try:
        for s in socks:
            s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        answers = []
        for s in socks:
            answer = b""
            while not answer.endswith(b"ok") and (chunk := s.recv(1024)):
                answer += chunk
            answers.append(answer)
        return answers
    finally:
        for s in socks:
            s.close()


def test_a_busy_loop_accepts_a_burst_of_connections_within_a_few_passes() -> None:
    """uvloop accepts one connection per loop pass; a busy gateway's pass takes 10-20 ms,
    so 512 clients reconnecting together waited up to 5 s in the kernel's queue
    (benchmarks/RESULTS.md). Here a loop is kept busy (5 ms of work per pass) while 100
    clients connect at once: all are answered, in far fewer passes than one each."""

    async def main() -> tuple[list[bytes], int, int]:
        config = uvicorn.Config(_app, port=0, log_level="warning", lifespan="off", http="httptools")
        server = GatewayServer(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn only exposes a flag)
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        passes = 0

        async def busy() -> None:
            nonlocal passes
            while True:
                time.sleep(0.005)  # noqa: ASYNC251 (a busy pass over many streams, on purpose)
                passes += 1
                await asyncio.sleep(0)

        hog = asyncio.create_task(busy())
        answers = await asyncio.to_thread(_clients, port)
        used = passes
        hog.cancel()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        return answers, used, len(server.server_state.connections)

    answers, passes, left = uvloop.run(main())  # the gateway's loop
    assert len(answers) == CLIENTS
    assert all(a.startswith(b"HTTP/1.1 200") and a.endswith(b"ok") for a in answers)
    assert passes < CLIENTS // 4, passes  # one accept per pass would need >= 100
    assert left == 0


def test_an_accept_error_pauses_the_listener_then_it_serves_again() -> None:
    """Out of file descriptors (EMFILE), accept fails while the connection stays queued:
    the listener stops watching the socket for a moment instead of spinning on it (a
    level-triggered listener that kept watching would call accept thousands of times in
    0.3 s), then accepts the waiting client."""
    import errno

    async def main() -> tuple[bytes, int]:
        config = uvicorn.Config(_app, port=0, log_level="warning", lifespan="off", http="httptools")
        server = GatewayServer(config)
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 (uvicorn only exposes a flag)
            await asyncio.sleep(0.01)
        listener = server.servers[0]
        real, failures = listener.sock, 0

        class Failing:  # the listening socket, failing its first accept as at EMFILE
            def __getattr__(self, name: str):
                return getattr(real, name)

            def accept(self):
                nonlocal failures
                if time.monotonic() < until:
                    failures += 1
                    raise OSError(errno.EMFILE, "Too many open files")
                return real.accept()

        until = time.monotonic() + 0.3
        listener.sock = Failing()
        port = real.getsockname()[1]
        answer = await asyncio.to_thread(_clients_one, port)
        listener.sock = real
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        return answer, failures

    answer, failures = uvloop.run(main())
    assert 1 <= failures <= 6, failures  # one try per ACCEPT_PAUSE_S (0.1 s), not a spin
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")


def _clients_one(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"ok") and (chunk := s.recv(1024)):
            answer += chunk
        return answer
