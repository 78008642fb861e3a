"""Ctrl-C, SIGTERM and a half-failed start leave no vLLM process behind, and no socket
files: each engine run's ZeroMQ sockets live in a folder of their own, removed at stop."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.utils import GatewayProcess, default_engine, write_config


def _socket_dirs() -> set[Path]:
    """The engine runs' socket folders (serving/engines/process.py: socket_dir)."""
    return set(Path(tempfile.gettempdir()).glob("tiergate-sockets-*"))


def _api_servers(gw: GatewayProcess, model: str) -> set[int]:
    """The pids of the vLLM API servers serving `model` (--served-model-name)."""
    return {
        p.pid
        for p in gw.descendants()
        if "api_server" in (cmd := " ".join(p.cmdline())) and f"--served-model-name {model}" in cmd
    }


def _assert_no_survivors(gw: GatewayProcess) -> None:
    assert gw.seen, "the test saw no engine processes at all"
    assert not gw.survivors(), f"orphans: {gw.survivors()}\n{gw.log_tail()}"


def test_two_workers_serve_the_real_engine_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    # server.workers: 2 gateway processes on one port beside the engine's supervisor.
    # (One worker's Ctrl-C is the session gateway's teardown, tests/conftest.py.)
    # the chat engine alone: the embedding engine would add start-up time, not coverage
    config = write_config(tmp_path / "c.yaml", engines=[default_engine()], server={"workers": 2})
    before = _socket_dirs()
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready()
        ours = _socket_dirs() - before
        assert len(ours) == 1, ours  # the engine's sockets, in a folder of its own
        assert any(p.is_socket() for p in next(iter(ours)).iterdir())
        workers = [p for p in gw.descendants() if "serving.workers" in " ".join(p.cmdline())]
        assert len(workers) == 2
        assert len(gw.descendants()) >= 4  # 2 workers, the API server and its EngineCore
        body = {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
        }
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda i: httpx.post(
                        gw.url + "/v1/chat/completions",
                        json={**body, "stream": i % 2 == 0},
                        timeout=120,
                    ),
                    range(16),
                )
            )
        assert [r.status_code for r in replies] == [200] * 16
        metrics = gw.get("/metrics").text  # any worker's answer sums both workers
        served = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("tiergate_requests_total{") and 'status="200"' in line
        )
        assert served == 16
        # A planned engine restart through a worker: the parent drains the engine across
        # both workers (a stream in flight runs to its end), then replaces it.
        engine_pids = _api_servers(gw, "smollm2-135m-instruct")
        drained: list[str] = []
        started = threading.Event()

        def stream(into: list[str], tokens: int) -> None:
            ask = {**body, "max_tokens": tokens, "ignore_eos": True, "stream": True}
            ask["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json=ask, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        into.append(line)
                        started.set()

        streamer = threading.Thread(target=stream, args=(drained, 200))
        streamer.start()
        assert started.wait(60)
        restart = httpx.post(
            gw.url + "/tiergate/engines/smollm2-cpu/restart",
            params={"drain_timeout": 60},
            timeout=300,
        )
        streamer.join(60)
        assert restart.status_code == 200, restart.text
        assert restart.json()["restarts"] == 1 and restart.json()["state"] == "ready"
        assert drained[-1] == "data: [DONE]" and not any('"error"' in e for e in drained)
        usage = json.loads(drained[-2].removeprefix("data: "))["usage"]
        assert usage["completion_tokens"] == 200  # all of it, through the drain
        gw.wait_for(lambda: gw.engine("smollm2-cpu")["ready"], 60, "the workers to see it back")
        now = _api_servers(gw, "smollm2-135m-instruct")
        assert now and not now & engine_pids  # a new engine process
        assert "draining for a restart" in gw.log_tail(400)
        # A long stream is in flight when Ctrl-C comes: it drains to its end
        # (server.drain_timeout, 30 s) before the workers and the engine stop.
        events: list[str] = []
        first = threading.Event()

        def long_stream() -> None:
            long = {**body, "max_tokens": 120, "ignore_eos": True, "stream": True}
            long["stream_options"] = {"include_usage": True}
            with httpx.stream("POST", gw.url + "/v1/chat/completions", json=long, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        first.set()

        client = threading.Thread(target=long_stream)
        client.start()
        assert first.wait(60)
        os.killpg(gw.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        client.join(90)
        gw.proc.wait(90)
        assert gw.proc.returncode in (0, 130)
        assert events[-1] == "data: [DONE]"
        assert not any('"error"' in e for e in events)
        assert '"completion_tokens":120' in events[-2]  # every token, then usage
        _assert_no_survivors(gw)
        assert "tiergate is ready on" in gw.log_tail(400)
        assert "2 gateway workers on port" in gw.log_tail(400)
    assert not _socket_dirs() - before  # each run's folder went with the sockets in it


def test_sigterm_during_start_up_stops_the_starting_engine(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_for(
            lambda: gw.engines()[0]["pid"] is not None and len(gw.descendants()) >= 1,
            120,
            "the engine process",
        )
        assert gw.engines()[0]["state"] == "starting"
        assert gw.stop(signal.SIGTERM, timeout=60) is not None
        _assert_no_survivors(gw)


def test_start_up_failing_half_way_stops_everything(tmp_path: Path) -> None:
    """An engine that passes tiergate's checks but dies while starting (here: the checks
    are switched off, so vLLM itself rejects an impossible max_model_len)."""
    good = default_engine()
    bad = default_engine(name="broken", args={**good["args"], "max_model_len": 1_000_000})
    bad["env"] = {k: v for k, v in bad["env"].items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    config = write_config(tmp_path / "c.yaml", engines=[good, bad], validate_engine_args=False)
    before = _socket_dirs()
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_for(lambda: len(gw.descendants()) >= 2, 120, "both engines")
        gw.proc.wait(300)
        assert gw.proc.returncode == 1
        log = gw.log_tail(300)
        assert "start-up failed, stopping everything" in log
        assert "engine broken" in log
        _assert_no_survivors(gw)
    assert _socket_dirs() <= before  # neither engine's socket folder is left
