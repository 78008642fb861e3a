"""A killed engine: it shows as not ready and a request is held (router.wait_ready_s) until the
supervisor has restarted it, then answered. A response it stored is gone with it: a 404
that says why, while it is down and after it is back.

Runs on the shared session gateway, after the other real-engine tests (file order).
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil

from tests.utils import GatewayProcess


def test_killed_engine_is_restarted(gateway: GatewayProcess, model: str) -> None:
    before = gateway.engine("smollm2-cpu")
    old_pid = before["pid"]
    assert before["state"] == "ready" and psutil.pid_exists(old_pid)
    old_group = [p.pid for p in psutil.Process(old_pid).children(recursive=True)]
    assert old_group, "vLLM forks an EngineCore"

    stored = httpx.post(
        gateway.url + "/v1/responses",
        timeout=60,
        json={"model": model, "input": "My name is Ada.", "store": True, "max_output_tokens": 4},
    )
    assert stored.status_code == 200, stored.text
    stored_id = stored.json()["id"]
    assert httpx.get(f"{gateway.url}/v1/responses/{stored_id}", timeout=30).status_code == 200

    os.kill(old_pid, signal.SIGKILL)  # the vLLM API server dies without warning

    gateway.wait_for(lambda: not gateway.engine("smollm2-cpu")["ready"], 15, "the engine not ready")
    _assert_gone(gateway, model, stored_id, "gone")  # at once, not held for the restart
    # /ready answers for the gateway: the embedding engine still serves
    assert gateway.get("/ready").json()["engines"] == ["minilm-cpu"]
    killed = time.monotonic()
    held = httpx.post(  # held while the engine restarts (router.wait_ready_s: 60 s)
        gateway.url + "/v1/chat/completions",
        timeout=300,
        json={"model": model, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
    )
    took = time.monotonic() - killed
    if held.status_code == 503:  # this host restarts the engine in more than 60 s
        assert took >= 59 and held.json()["error"]["code"] == "no_engine_ready", held.text
    else:
        assert held.status_code == 200, held.text
        assert held.json()["usage"]["completion_tokens"] > 0
    print(f"a request during the restart: {held.status_code} after {took:.1f} s")

    gateway.wait_for(lambda: gateway.engine("smollm2-cpu")["ready"], 300, "the engine back")
    after = gateway.engine("smollm2-cpu")
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
    _assert_gone(gateway, model, stored_id, "not found")  # the new process never had it
    assert (
        'tiergate_engine_restarts_total{engine="smollm2-cpu"} 1.0' in gateway.get("/metrics").text
    )


def _assert_gone(gateway: GatewayProcess, model: str, response_id: str, words: str) -> None:
    """Reading, cancelling and continuing from it: 404 in the envelope, naming the
    client's id."""
    read = httpx.get(f"{gateway.url}/v1/responses/{response_id}", timeout=30)
    cancel = httpx.post(f"{gateway.url}/v1/responses/{response_id}/cancel", timeout=30)
    turn = httpx.post(
        gateway.url + "/v1/responses",
        timeout=60,
        json={"model": model, "input": "And?", "previous_response_id": response_id},
    )
    for r, param in (
        (read, "response_id"),
        (cancel, "response_id"),
        (turn, "previous_response_id"),
    ):
        assert r.status_code == 404, r.text
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["param"] == param and error["type"] == "invalid_request_error"
        assert words in error["message"] and "memory" in error["message"], error
        assert response_id in error["message"] or param == "previous_response_id", error
