"""server.front: a second process owns the port, parks idle keep-alive connections and
answers max_in_flight 429s itself; every other request is served by the gateway on the
socket the front hands over. Against FAKE engines (one that stalls streams on demand,
one that streams like decode steps): a real engine cannot be made to stall."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from serving.api.head import Head, parse_head
from serving.front import channel
from tests.fake_engine import FakeEngine
from tests.test_workers_fake import _workers
from tests.utils import GatewayProcess

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True}


# -- the head parser (pure)
def test_parse_head_reads_what_the_front_needs() -> None:
    raw = (
        b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 12\r\n"
        b"Connection: keep-alive\r\n\r\n{}"
    )
    assert parse_head(raw) == Head(
        b"POST",
        b"/v1/chat/completions",
        raw.index(b"{}"),
        12,
        chunked=False,
        expect=False,
        close=False,
    )
    assert parse_head(raw[:20]) is None  # incomplete: wait for more
    one = parse_head(b"GET / HTTP/1.0\r\n\r\n")
    assert one is not None and one.close  # HTTP/1.0 closes unless asked to keep alive
    keep = parse_head(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
    assert keep is not None and not keep.close
    odd = parse_head(
        b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    assert odd is not None and (odd.chunked, odd.expect, odd.close) == (True, True, True)


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /v1/completions HTTP/2\r\n\r\n",
        b"garbage\r\n\r\n",
        b"POST / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    ],
)
def test_parse_head_leaves_odd_requests_to_the_gateway(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_head(raw)


def test_channel_messages_round_trip() -> None:
    gateway, front = channel.pair()
    r, w = socket.socketpair()

    async def exchange() -> None:
        errors: list[str] = []
        to_gateway = channel.Sender(front, lambda: errors.append("gone"))
        to_gateway.send(channel.hand(7, True, b"POST / HTTP/1.1\r\n"), r.fileno())
        to_gateway.send(channel.resume(7, False, b"next"))
        to_gateway.send(channel.stats([3, 4]))
        gateway.setblocking(False)
        got = channel.receive(gateway)
        assert got is not None and len(got) == 3
        kind, conn_id, counted, data, fd = got[0]
        assert (kind, conn_id, counted, data) == (channel.HAND, 7, True, b"POST / HTTP/1.1\r\n")
        os.write(fd, b"!")  # the passed descriptor is the same socket
        assert w.recv(1) == b"!"
        os.close(fd)
        assert got[1:] == [(channel.RESUME, 7, False, b"next"), (channel.STATS, 3, 4)]

        # the front does not read for a while: DONEs wait, in order, none lost
        to_front = channel.Sender(gateway, lambda: errors.append("gone"))
        for i in range(0, 20000, 2):  # a loop pass's records go in one packet
            to_front.send(channel.done([(i, channel.RETURNED), (i + 1, channel.KEPT)]))
        assert to_front.queue  # the pair's buffer filled; the rest waits here
        front.setblocking(False)
        seen: list[tuple[int, int]] = []
        while len(seen) < 20000:
            for message in channel.receive(front) or []:
                assert message[0] == channel.DONE
                seen.extend(message[1:])
            await asyncio.sleep(0.001)  # the sender's writer callback runs
        assert seen == [(i, channel.RETURNED if i % 2 == 0 else channel.KEPT) for i in range(20000)]
        assert not to_front.queue and not errors
        with pytest.raises(ValueError):
            channel.decode(bytes([channel.DONE]), [])  # a DONE with no record
        to_front.send(channel.close(8))
        await asyncio.sleep(0)
        assert channel.receive(front) == [(channel.CLOSE, 8)]
        with pytest.raises(ValueError):
            channel.decode(b"\x09junk", [])
        gateway.close()
        assert channel.receive(front) is None  # the other end is gone
        to_gateway.send(channel.stop())
        assert errors == ["gone"]

    try:
        asyncio.run(exchange())
    finally:
        for s in (front, r, w):
            s.close()


# -- the front in front of a real gateway process
def _config(tmp_path: Path, url: str, **server) -> Path:
    path = tmp_path / "front.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "server": {"front": True, "drain_timeout": 1, **server},
                "engines": [{"name": "e", "model": "m", "url": url}],
                "timeouts": {"health_interval": 0.2},
            }
        )
    )
    return path


@contextlib.contextmanager
def _fronted(tmp_path: Path, force: str, **server) -> Iterator[tuple[FakeEngine, GatewayProcess]]:
    """A FAKE engine behind a ready gateway with server.front (and these settings)."""
    with FakeEngine(force=force) as fake:
        config = _config(tmp_path, fake.url, **server)
        with GatewayProcess(config, tmp_path / "serve.log") as gw:
            gw.wait_ready(60)
            yield fake, gw


def _fronts(gw: GatewayProcess) -> list[psutil.Process]:
    found = []
    for p in gw.descendants():
        try:
            if "serving.front.acceptor" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def _refused(gw: GatewayProcess) -> float:
    """The in_flight 429s on /metrics (the fronts' and the gateway's, every worker's)."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in gw.get("/metrics").text.splitlines()
        if line.startswith('tiergate_admission_refused_total{reason="in_flight"}')
    )


def _gone(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _post(path: str, body: dict, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        f"content-length: {len(data)}\r\n{extra}\r\n"
    ).encode() + data


class Raw:
    """One keep-alive connection, read response by response (chunked or sized)."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buf = b""

    def _until(self, ready) -> None:
        while not ready():
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data

    def response(self) -> tuple[int, dict[str, str], bytes]:
        self._until(lambda: b"\r\n\r\n" in self.buf)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            self._until(lambda: len(self.buf) >= n)
            body, self.buf = self.buf[:n], self.buf[n:]
        else:  # chunked: up to the last chunk
            self._until(lambda: b"0\r\n\r\n" in self.buf)
            end = self.buf.index(b"0\r\n\r\n") + 5
            body, self.buf = self.buf[:end], self.buf[end:]
        return int(lines[0].split(" ", 2)[1]), headers, body

    def closed(self) -> bool:
        self.sock.settimeout(5)
        return self.sock.recv(1) == b""


def test_front_serves_keep_alive_pipelined_and_closing_connections(tmp_path: Path) -> None:
    with _fronted(tmp_path, "drip") as (fake, gw):
        assert len(_fronts(gw)) == 1
        conn = Raw(gw.url)
        for _ in range(3):  # one connection, parked in the front between requests
            conn.sock.sendall(_post("/v1/chat/completions", CHAT))
            status, _, body = conn.response()
            assert status == 200 and b"data: [DONE]" in body and body.count(b"tok") == 20
        conn.sock.sendall(b"GET /health HTTP/1.1\r\nhost: gw\r\n\r\n")
        assert conn.response()[0] == 200
        # two requests in one write: the gateway keeps that connection and answers both
        conn.sock.sendall(_post("/v1/chat/completions", CHAT) * 2)
        assert [conn.response()[0] for _ in range(2)] == [200, 200]
        conn.sock.sendall(_post("/v1/chat/completions", CHAT))
        assert conn.response()[0] == 200
        last = Raw(gw.url)
        last.sock.sendall(_post("/v1/chat/completions", CHAT, "connection: close\r\n"))
        assert last.response()[0] == 200 and last.closed()
        assert len(fake.app.state.seen) == 7
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_front_refuses_at_capacity_and_loses_nothing(tmp_path: Path) -> None:
    with _fronted(tmp_path, "stall-stream", max_in_flight=2, access_log="json") as (fake, gw):

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=10) as http:
                streams = [
                    http.stream("POST", gw.url + "/v1/chat/completions", json=CHAT)
                    for _ in range(12)
                ]
                replies = await asyncio.gather(*(s.__aenter__() for s in streams))
                statuses = [r.status_code for r in replies]
                refused = [r for r in replies if r.status_code == 429]
                for r in refused:
                    body = json.loads(await r.aread())
                    assert body["error"]["code"] == "rate_limit_exceeded"
                    assert body["error"]["type"] == "rate_limit_error"
                    assert r.headers["retry-after"] == "1"
                    assert 500 <= int(r.headers["retry-after-ms"]) <= 1500
                # while both slots are held: refused on a kept-alive connection,
                # the body sent after the head, twice on the same connection
                conn = Raw(gw.url)
                request = _post("/v1/chat/completions", CHAT)
                for _ in range(2):
                    conn.sock.sendall(request[:40])
                    await asyncio.sleep(0.1)
                    conn.sock.sendall(request[40:])
                    status, _, body = conn.response()
                    assert status == 429 and json.loads(body)["error"]["param"] is None
                for s in streams:  # the clients leave: the slots come back
                    await s.__aexit__(None, None, None)
                return statuses

        statuses = asyncio.run(burst())
        assert sorted(statuses) == [200] * 2 + [429] * 10
        assert len(fake.app.state.seen) == 2  # nothing refused reached the engine
        unary = {**CHAT, "stream": False}
        gw.wait_for(
            lambda: httpx.post(gw.url + "/v1/chat/completions", json=unary).status_code == 200,
            10,
            "a free slot",
        )

        gw.wait_for(lambda: _refused(gw) == 12, 10, "the front's refusals on /metrics")
        lines = [
            json.loads(line)
            for line in gw.log_path.read_text().splitlines()
            if line.startswith('{"time"') and '"by": "front"' in line
        ]
        assert len(lines) == 12  # the access log has the front's refusals too
        assert {(x["message"], x["status"], x["error"]) for x in lines} == {
            ("request", 429, "rate_limit_exceeded")
        }
        # uvicorn re-raises the signal once shut down: a SIGTERM exit, after a clean drain
        assert gw.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM), gw.log_tail()
        assert "Application shutdown complete" in gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_front_exits_when_the_gateway_dies(tmp_path: Path) -> None:
    with _fronted(tmp_path, "ok") as (_, gw):
        fronts = _fronts(gw)
        assert len(fronts) == 1
        os.kill(gw.proc.pid, signal.SIGKILL)  # no STOP: the front sees its pair close
        _, alive = psutil.wait_procs(fronts, timeout=10)
        assert not alive
        gw.stop()
    time.sleep(0.1)
    assert not gw.survivors(), gw.log_tail()


def test_a_dead_front_is_replaced(tmp_path: Path) -> None:
    with _fronted(tmp_path, "drip") as (_, gw):
        first = _fronts(gw)
        assert len(first) == 1
        # a stream in flight when the front dies is served to its end by the gateway
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT) as r:
            assert r.status_code == 200
            first[0].kill()
            body = b"".join(r.iter_bytes())
        assert body.endswith(b"data: [DONE]\n\n") and body.count(b"tok") == 20
        gw.wait_for(
            lambda: [p.pid for p in _fronts(gw)] not in ([], [first[0].pid]), 10, "a new front"
        )
        conn = Raw(gw.url)
        for _ in range(3):  # the new front serves the port, keep-alive included
            conn.sock.sendall(_post("/v1/chat/completions", CHAT))
            assert conn.response()[0] == 200
        assert "starting a new one" in gw.log_tail()
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_each_worker_has_its_own_front_refusing_at_its_share(tmp_path: Path) -> None:
    # server.workers 2: two fronts on one port (SO_REUSEPORT), each holding its worker's
    # share of max_in_flight (1 of 2). The FAKE engine stalls every stream after two
    # events, so each admitted stream holds its slot.
    with _fronted(tmp_path, "stall-stream", workers=2, max_in_flight=2) as (fake, gw):
        # wait_ready saw the first worker: the second's front may still be starting
        gw.wait_for(lambda: len(_fronts(gw)) == 2, 30, "both workers' fronts")
        workers, fronts = {p.pid for p in _workers(gw)}, _fronts(gw)
        assert len(workers) == 2 and len(fronts) == 2
        assert {f.ppid() for f in fronts} == workers  # one front per worker
        # 20 connections: the kernel spreads them over both fronts (all on one: 2^-19)
        conns = [Raw(gw.url) for _ in range(20)]
        for conn in conns:
            conn.sock.sendall(_post("/v1/chat/completions", CHAT))
        statuses = []
        for conn in conns:
            conn.sock.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.sock.recv(65536)
            statuses.append(int(head.split(b" ", 2)[1]))
        assert sorted(statuses) == [200, 200] + [429] * 18, statuses
        assert len(fake.app.state.seen) == 2  # nothing refused reached the engine

        gw.wait_for(lambda: _refused(gw) == 18, 10, "both fronts' refusals on /metrics")
        for conn in conns:  # the held streams end: their slots come back
            conn.sock.close()
        ok = {**CHAT, "stream": False}
        fake.app.state.force = "ok"
        gw.wait_for(
            lambda: httpx.post(gw.url + "/v1/chat/completions", json=ok).status_code == 200,
            10,
            "a free slot",
        )
        # A worker that dies takes its front with it; its replacement starts one.
        victim = fronts[0].ppid()
        os.kill(victim, signal.SIGKILL)
        gw.wait_for(
            lambda: len(_fronts(gw)) == 2 and fronts[0] not in _fronts(gw) and _gone(fronts[0]),
            30,
            "the dead worker's front gone and a new worker's front up",
        )
        assert {f.ppid() for f in _fronts(gw)} != workers
        replies = [httpx.post(gw.url + "/v1/chat/completions", json=ok) for _ in range(6)]
        assert [r.status_code for r in replies] == [200] * 6
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_refusal_budget_paces_clients_that_resend_at_once(tmp_path: Path) -> None:
    from serving.router.breaker import RefusalBudget

    budget = RefusalBudget(2)
    assert [budget.take(10.0) for _ in range(3)] == [True, True, False]
    assert budget.take(10.5)  # half a second refills one
    with _fronted(tmp_path, "stall-stream", max_in_flight=1, max_refusals_s=1) as (fake, gw):
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT) as held:
            assert held.status_code == 200  # the one slot
            conn = Raw(gw.url)
            request = _post("/v1/chat/completions", CHAT)
            conn.sock.sendall(request)
            assert conn.response()[0] == 429  # within the budget (one a second)
            conn.sock.sendall(request)  # at once, ignoring Retry-After: over the budget,
            status, headers, _ = conn.response()  # answered, and the connection paced
            assert status == 429
            wait = int(headers["retry-after-ms"]) / 1000
            t0 = time.monotonic()
            conn.sock.sendall(request)  # not read before that retry-after-ms
            status, _, _ = conn.response()
            assert status == 429 and time.monotonic() - t0 >= wait - 0.05
            paced = 0.0
            for _ in range(30):  # the front reports its counts once a second
                text = httpx.get(gw.url + "/metrics").text
                paced = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("tiergate_admission_paced_total")
                )
                if paced:
                    break
                time.sleep(0.1)
            assert paced >= 1
        assert len(fake.app.state.seen) == 1
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_the_fronts_429s_ask_a_sustained_overload_to_wait_longer(tmp_path: Path) -> None:
    """The front's own 429s follow server.retry_after_max_scale as the gateway's do
    (serving/api/retry_scale.py): ~30 refusals a second for one slot is ~30 clients per
    slot, so the retry-after goes 1, 2, 4, one step a second, in both headers and the
    message; the gateway's gauge shows the front's scale."""
    with _fronted(tmp_path, "stall-stream", max_in_flight=1, max_refusals_s=10_000) as (
        fake,
        gw,
    ):
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT) as held:
            assert held.status_code == 200  # the one slot
            conn = Raw(gw.url)
            request = _post("/v1/chat/completions", CHAT)
            seen: list[int] = []
            end = time.monotonic() + 2.6
            while time.monotonic() < end:
                conn.sock.sendall(request)
                status, headers, body = conn.response()
                assert status == 429
                after = int(headers["retry-after"])
                assert after * 500 <= int(headers["retry-after-ms"]) <= after * 1500
                assert f"retry after {after}s" in json.loads(body)["error"]["message"]
                seen.append(after)
                time.sleep(0.03)
            assert seen[0] == 1 and seen[-1] == 4, seen
            assert seen == sorted(seen) and set(seen) == {1, 2, 4}, seen  # one step at a time

            def scale() -> float:
                text = httpx.get(gw.url + "/metrics").text
                return sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("tiergate_admission_retry_after_scale")
                )

            gw.wait_for(lambda: scale() == 4, 10, "the front's scale on /metrics")
        assert len(fake.app.state.seen) == 1  # no refused request reached the engine
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


def test_the_front_starts_with_the_largest_retry_after_scale(tmp_path: Path) -> None:
    """Every scale's prebuilt 429s go to the front at start (~150 KB at the largest
    server.retry_after_max_scale): more than one command-line argument may hold."""
    with _fronted(tmp_path, "stall-stream", max_in_flight=1, retry_after_max_scale=60) as (
        fake,
        gw,
    ):
        assert len(_fronts(gw)) == 1
        with httpx.stream("POST", gw.url + "/v1/chat/completions", json=CHAT) as held:
            assert held.status_code == 200
            r = httpx.post(gw.url + "/v1/chat/completions", json=CHAT)
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert len(fake.app.state.seen) == 1
        assert gw.stop(signal.SIGINT, timeout=30) in (0, 130), gw.log_tail()
    assert gw.seen and not gw.survivors(), gw.log_tail()


@pytest.mark.parametrize("front", [True, False])
def test_port_clash_names_the_key(tmp_path: Path, front: bool) -> None:
    """With or without the front, the port is bound before anything starts."""
    import subprocess
    import sys

    from tests.utils import REPO

    taken = socket.create_server(("127.0.0.1", 0))
    try:
        port = taken.getsockname()[1]
        config = _config(tmp_path, "http://127.0.0.1:1", front=front)
        serve = ["serve", "--config", str(config), "--port", str(port)]
        run = subprocess.run(
            [sys.executable, "-m", "serving.cli", *serve],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        taken.close()
    assert run.returncode == 2, run.stderr[-2000:]
    assert f"server.port: cannot bind 127.0.0.1:{port}" in run.stderr


def test_done_records_leave_once_a_pass_and_at_once_near_the_limit() -> None:
    """The gateway's DONE records wait for the end of the loop pass (one wake-up of the
    front), at most DONE_BATCH of them; near server.max_in_flight each goes at once, so
    that the front's count is exact where it refuses. FAKE sender and hot path."""

    async def run() -> None:
        from types import SimpleNamespace

        from serving.front.handoff import DONE_BATCH, FrontLink

        sent: list[list[tuple[int, int]]] = []
        link = FrontLink(socket.socket(), metrics=None)
        link.loop, link.factory = asyncio.get_running_loop(), object()
        link.out = SimpleNamespace(
            send=lambda parts: sent.append(list(channel.decode(b"".join(parts), [])[1:]))
        )
        link.hot, link.max_in_flight = SimpleNamespace(in_flight=0), 100
        for i in range(3):
            assert link.report(i, channel.RETURNED)
        assert sent == []  # queued for the end of the pass
        await asyncio.sleep(0)
        assert sent == [[(0, 0), (1, 0), (2, 0)]]
        for i in range(DONE_BATCH + 1):
            link.report(10 + i, channel.KEPT)
        assert sent[1] == [(10 + i, channel.KEPT) for i in range(DONE_BATCH)]  # a full batch
        await asyncio.sleep(0)
        assert sent[2] == [(10 + DONE_BATCH, channel.KEPT)]
        link.hot.in_flight = 100 - DONE_BATCH - 1  # near the limit: no record waits
        link.report(50, channel.CLOSED)
        assert sent[3] == [(50, channel.CLOSED)]
        await asyncio.sleep(0)
        assert len(sent) == 4  # the pass's flush found nothing left
        link.hot.in_flight = 0
        link.report(60, channel.RETURNED)
        link._detach()  # the front is gone: a new one knows none of these ids
        await asyncio.sleep(0)
        assert len(sent) == 4 and link.done == []
        link.listener.close()

    asyncio.run(run())
