"""Ctrl-C, SIGTERM and a half-failed start leave no vLLM process behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from tests.utils import GatewayProcess, default_engine, write_config


def _assert_no_survivors(gw: GatewayProcess) -> None:
    assert gw.seen, "the test saw no engine processes at all"
    assert not gw.survivors(), f"orphans: {gw.survivors()}\n{gw.log_tail()}"


def test_ctrl_c_after_ready_stops_every_engine_process(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml")
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready()
        assert len(gw.descendants()) >= 2  # the API server and its EngineCore
        os.killpg(gw.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        gw.proc.wait(60)
        assert gw.proc.returncode in (0, 130)
        _assert_no_survivors(gw)
        assert "tiergate is ready on" in gw.log_tail(400)


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
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_for(lambda: len(gw.descendants()) >= 2, 120, "both engines")
        gw.proc.wait(300)
        assert gw.proc.returncode == 1
        log = gw.log_tail(300)
        assert "start-up failed, stopping everything" in log
        assert "engine broken" in log
        _assert_no_survivors(gw)
