"""A killed engine: /ready and requests turn 503, the supervisor restarts it, service resumes.

Runs on the shared session gateway, after the other real-engine tests (file order).
"""

from __future__ import annotations

import os
import signal

import httpx
import psutil

from tests.utils import GatewayProcess


def test_killed_engine_is_restarted(gateway: GatewayProcess, model: str) -> None:
    before = gateway.engines()[0]
    old_pid = before["pid"]
    assert before["state"] == "ready" and psutil.pid_exists(old_pid)
    old_group = [p.pid for p in psutil.Process(old_pid).children(recursive=True)]
    assert old_group, "vLLM forks an EngineCore"

    os.kill(old_pid, signal.SIGKILL)  # the vLLM API server dies without warning

    gateway.wait_for(lambda: gateway.get("/ready").status_code == 503, 15, "/ready 503")
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=30,
        json={"model": model, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_engine_ready"
    assert r.json()["error"]["type"] == "service_unavailable_error"

    gateway.wait_ready(timeout=300)
    after = gateway.engines()[0]
    assert after["pid"] != old_pid
    assert after["restarts"] == before["restarts"] + 1
    for pid in [old_pid, *old_group]:  # the dead engine's EngineCore did not leak
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    r = httpx.post(
        gateway.url + "/v1/chat/completions",
        timeout=60,
        json={"model": model, "max_tokens": 5, "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] > 0
    assert (
        'tiergate_engine_restarts_total{engine="smollm2-cpu"} 1.0' in gateway.get("/metrics").text
    )
