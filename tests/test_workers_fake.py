"""server.workers: N gateway processes on one port, against a FAKE engine (no vLLM start,
so this runs in seconds): every request is served, /metrics sums all workers, limits
are shared out, a killed worker is replaced, and SIGTERM leaves nothing running."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import yaml

from serving.config import Settings
from serving.workers import worker_settings
from tests.fake_engine import FakeEngine
from tests.utils import GatewayProcess


def _workers(gw: GatewayProcess) -> list[psutil.Process]:
    found = []
    for p in gw.descendants():
        try:  # a process may exit between the listing and the read (the killed worker)
            if "serving.workers" in " ".join(p.cmdline()):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


def test_worker_settings_share_the_limits() -> None:
    settings = Settings(
        engines=[{"name": "e", "model": "m"}],
        server={"workers": 3, "max_in_flight": 100, "max_refusals_s": 900},
        router={"spill": {"max_in_flight": 10}},
    )
    one = worker_settings(settings, {"e": "http://127.0.0.1:1"}, 3)
    assert one.engines[0].url == "http://127.0.0.1:1"
    assert (one.server.workers, one.server.max_in_flight) == (1, 34)
    assert one.server.max_refusals_s == 300
    assert one.router.spill.max_in_flight == 4
    assert settings.engines[0].url is None  # the parent's settings are untouched


def test_two_workers_share_one_port_and_stop_together(tmp_path: Path) -> None:
    with FakeEngine(force="ok") as fake:
        config = tmp_path / "w.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "server": {"workers": 2},
                    "engines": [{"name": "fake", "model": "m", "url": fake.url}],
                    "timeouts": {"health_interval": 0.2},
                }
            )
        )
        with GatewayProcess(config, tmp_path / "serve.log") as gw:
            gw.wait_ready(60)
            first = _workers(gw)
            assert len(first) == 2
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}

            def busy(p: psutil.Process) -> float:
                return p.cpu_times().user + p.cpu_times().system

            before = [busy(p) for p in first]
            with ThreadPoolExecutor(16) as pool:
                replies = list(
                    pool.map(
                        lambda i: httpx.post(
                            gw.url + "/v1/chat/completions",
                            json={**body, "stream": i % 2 == 0},
                            timeout=30,
                        ),
                        range(200),
                    )
                )
            assert [r.status_code for r in replies] == [200] * 200
            assert len(fake.app.state.seen) == 200
            metrics = gw.get("/metrics").text
            served = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("tiergate_requests_total{") and 'status="200"' in line
            )
            assert served == 200  # both workers' counts, whichever answered
            # both workers took connections (SO_REUSEPORT spreads them): both worked
            assert all(busy(p) - b > 0.02 for p, b in zip(first, before, strict=True))

            shared = Path(first[0].environ()["PROMETHEUS_MULTIPROC_DIR"])
            dead = shared / f"gauge_livesum_{first[0].pid}.db"
            assert dead.exists()  # its requests in flight, live
            os.kill(first[0].pid, signal.SIGKILL)  # a worker dies: it is replaced

            def replaced() -> bool:  # one listing: the kill lands a moment after os.kill
                now = _workers(gw)
                return len(now) == 2 and first[0] not in now

            gw.wait_for(replaced, 30, "a new worker")
            assert not dead.exists()  # a dead worker's in-flight gauge no longer counts
            assert (
                httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code
                == 200
            )
            assert gw.stop(signal.SIGTERM, timeout=30) == 0
        assert gw.seen and not gw.survivors(), gw.log_tail()


def test_the_first_request_after_start_up_finds_the_engine_ready() -> None:
    """A worker binds its port before its app starts, so requests wait there for it; the
    first of them must meet engines already asked, not a 503 until the first poll (CI
    saw 503s from the test above). Here the poll's interval is a minute: only the
    start-up's own check can have made the engine ready."""
    from serving.app import create_app

    async def first() -> None:
        settings = Settings(
            engines=[
                {"name": "fake", "model": "m", "url": fake.url},
                {"name": "gone", "model": "g", "url": "http://127.0.0.1:1"},
            ],
            timeouts={"health_interval": 60},
        )
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                r = await client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"]
                r = await client.get("/ready")
                assert r.json() == {"status": "ready", "engines": ["fake"]}
                r = await client.post("/v1/chat/completions", json={**body, "model": "g"})
                assert r.status_code == 503  # the engine that does not answer is not ready
                assert r.json()["error"]["code"] == "no_engine_ready"
        assert len(fake.app.state.seen) == 1

    with FakeEngine(force="ok") as fake:
        asyncio.run(first())


def test_a_worker_forwards_a_restart_to_the_parent(tmp_path: Path) -> None:
    """With server.workers > 1 the parent supervises the engines; a worker asked to
    restart one forwards it over the parent's control socket (here a FAKE parent that
    answers as serving/restart_control.py does) and relays the answer: 200 with the
    parent's figures, its 409 and 404 in the OpenAI error shape, and a 409 when no
    parent answers. A name the parent does not supervise is the worker's own 404."""
    from tests.fake_engine import in_process_gateway

    socket = tmp_path / "control.sock"
    asked: list[dict] = []
    answers = [
        {"status": 200, "engine": "cpu", "state": "ready", "restarts": 1, "seconds": 3.5},
        {"status": 409, "message": "Cannot restart it now: it is starting."},
    ]

    async def parent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        asked.append(json.loads(await reader.readline()))
        writer.write(json.dumps(answers.pop(0)).encode() + b"\n")
        await writer.drain()
        writer.close()

    async def ask() -> None:
        server = await asyncio.start_unix_server(parent, path=str(socket))
        settings = Settings(engines=[{"name": "cpu", "model": "m", "url": fake.url}])
        async with in_process_gateway(settings) as client:
            client.app.state.parent_supervises = {"cpu"}  # as worker_main sets them
            client.app.state.parent_control = socket
            r = await client.post("/tiergate/engines/cpu/restart", params={"drain_timeout": 7})
            assert r.status_code == 200
            assert r.json() == {"engine": "cpu", "state": "ready", "restarts": 1, "seconds": 3.5}
            assert asked == [{"engine": "cpu", "drain": 7.0}]
            r = await client.post("/tiergate/engines/cpu/restart")
            assert r.status_code == 409 and "starting" in r.json()["error"]["message"]
            assert asked[-1]["drain"] == settings.server.drain_timeout  # the default
            server.close()
            await server.wait_closed()
            socket.unlink(missing_ok=True)
            r = await client.post("/tiergate/engines/cpu/restart")
            error = r.json()["error"]
            assert r.status_code == 409 and error["code"] == "conflict"
            assert "parent process did not answer" in error["message"]
            r = await client.post("/tiergate/engines/nope/restart")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert len(asked) == 2

    with FakeEngine(force="ok") as fake:
        asyncio.run(ask())


def test_a_draining_flag_takes_an_engine_out_of_rotation_until_it_is_removed(
    tmp_path: Path,
) -> None:
    """A worker's health poll reads the parent's draining flags: a flagged engine is
    "draining" and not ready though it answers /health; without the flag it is back."""
    from serving.metrics import GatewayMetrics
    from serving.router.registry import Endpoint, EngineRegistry
    from serving.upstream.client import UpstreamClient
    from serving.upstream.health import check_once

    flags = tmp_path / "draining"
    flags.mkdir()

    def draining(name: str) -> bool:
        return (flags / name).exists()

    async def poll() -> None:
        registry = EngineRegistry()
        ep = Endpoint(name="cpu", model="m", url=fake.url, state="external")
        registry.add(ep)
        http = UpstreamClient(Settings(engines=[{"name": "cpu", "model": "m"}]).timeouts, 4)
        await http.start()
        try:
            await check_once(http, registry, GatewayMetrics(), 2.0, draining)
            assert ep.ready and ep.state == "ready"
            (flags / "cpu").touch()
            await check_once(http, registry, GatewayMetrics(), 2.0, draining)
            assert not ep.ready and ep.state == "draining"
            (flags / "cpu").unlink()
            await check_once(http, registry, GatewayMetrics(), 2.0, draining)
            assert ep.ready and ep.state == "ready"
        finally:
            await http.close()

    with FakeEngine(force="ok") as fake:
        asyncio.run(poll())


def test_the_parent_reads_the_workers_requests_in_flight_from_their_metrics_files(
    tmp_path: Path,
) -> None:
    """Two worker processes hold 2 and 1 requests in flight to one engine, 5 to another;
    the parent's drain reads their sum per engine from the shared metrics folder."""
    import subprocess
    import sys

    from serving.restart_control import workers_in_flight

    hold = (
        "import sys\n"
        "from serving.metrics import GatewayMetrics\n"
        "m = GatewayMetrics()\n"
        "for engine, n in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    m.in_flight_add(engine, int(n))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for args in (["cpu", "2", "gpu", "5"], ["cpu", "1"]):
        subprocess.run([sys.executable, "-c", hold, *args], env=env, check=True, timeout=60)
    assert workers_in_flight(tmp_path, "cpu") == 3
    assert workers_in_flight(tmp_path, "gpu") == 5
    assert workers_in_flight(tmp_path, "none") == 0


def test_a_second_restart_asked_while_one_drains_is_409(tmp_path: Path) -> None:
    """The parent's answer to a restart of an engine it is already draining is 409 at
    once, as one process answers, not a second restart queued behind the first; once
    the first is answered, the engine can be restarted again. A FAKE supervisor stands
    in for the engine's (its replace waits until the test lets it go)."""
    from types import SimpleNamespace

    from serving.restart_control import ParentControl

    release, replacing = asyncio.Event(), asyncio.Event()
    replaced: list[float] = []

    async def replace(drain: float, ready_timeout: float) -> bool:
        replaced.append(drain)
        replacing.set()
        await release.wait()
        return True

    runner = SimpleNamespace(
        endpoint=SimpleNamespace(state="ready"),
        replace=replace,
        restarted=lambda started: {"engine": "cpu", "restarts": len(replaced)},
    )
    supervisor = SimpleNamespace(runner=lambda name: runner)
    settings = Settings(engines=[{"name": "cpu", "model": "m"}], timeouts={"health_interval": 0.1})
    (tmp_path / "metrics").mkdir()

    async def twice() -> None:
        control = ParentControl(settings, supervisor, tmp_path)
        first = asyncio.create_task(control.restart("cpu", 5.0))
        busy = {"status": 409, "message": "Cannot restart it now: it is draining."}
        await asyncio.sleep(0.05)  # the workers' health polls are seeing the flag
        assert (tmp_path / "draining" / "cpu").exists() and not replaced
        # (a second ask that queued behind the first would time out here)
        assert await asyncio.wait_for(control.restart("cpu", 5.0), 2) == busy
        await replacing.wait()  # drained (nothing in flight): replacing
        assert await asyncio.wait_for(control.restart("cpu", 5.0), 2) == busy
        release.set()
        assert (await first)["status"] == 200
        assert not (tmp_path / "draining" / "cpu").exists()
        again = await control.restart("cpu", 5.0)  # a new ask after the answer is served
        assert again == {"status": 200, "engine": "cpu", "restarts": 2}
        assert len(replaced) == 2

    asyncio.run(twice())
