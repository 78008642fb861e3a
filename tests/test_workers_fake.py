"""server.workers: N gateway processes on one port, against a FAKE engine (no vLLM start,
so this runs in seconds): every request is served, /metrics sums all workers, limits
are shared out, a killed worker is replaced, and SIGTERM leaves nothing running."""

from __future__ import annotations

import asyncio
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

            os.kill(first[0].pid, signal.SIGKILL)  # a worker dies: it is replaced
            gw.wait_for(
                lambda: len(_workers(gw)) == 2 and first[0] not in _workers(gw), 30, "a new worker"
            )
            assert (
                httpx.post(gw.url + "/v1/chat/completions", json=body, timeout=30).status_code
                == 200
            )
            assert gw.stop(signal.SIGTERM, timeout=30) == 0
        assert gw.seen and not gw.survivors(), gw.log_tail()


def test_a_worker_says_why_it_cannot_restart_the_parents_engine() -> None:
    """With server.workers > 1 the parent supervises the engines; a worker asked to
    restart one answers 409 naming server.workers (not 404 "no such engine"), and an
    unknown name is still a 404. Both in the OpenAI error shape."""
    from tests.fake_engine import in_process_gateway

    async def ask() -> None:
        settings = Settings(engines=[{"name": "cpu", "model": "m", "url": fake.url}])
        async with in_process_gateway(settings) as client:
            client.app.state.parent_supervises = {"cpu"}  # as worker_main sets it
            r = await client.post("/tiergate/engines/cpu/restart")
            assert r.status_code == 409
            error = r.json()["error"]
            assert "server.workers" in error["message"] and error["param"] == "name"
            assert error["code"] == "conflict"
            r = await client.post("/tiergate/engines/nope/restart")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"

    with FakeEngine(force="ok") as fake:
        asyncio.run(ask())
