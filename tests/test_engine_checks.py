"""Engine configs are checked before anything starts: vLLM's own argument checks, and
the memory planner. A bad one fails `tiergate serve` at once, naming the key."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from serving.engines import validate
from tests.utils import REPO, default_engine, write_config


def serve(config, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.cli", "serve", "--config", str(config), "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_engine_args_fail_fast_naming_each_argument(tmp_path) -> None:
    engines = [
        default_engine(name="typo", args={"max_num_seq": 64}),
        default_engine(name="too-long", args={"max_model_len": 100000, "enforce_eager": True}),
        default_engine(name="bad-choice", args={"kv_cache_dtype": "fp7"}),
    ]
    config = write_config(tmp_path / "bad.yaml", engines=engines)
    done = serve(config, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    err = done.stderr
    assert "engines.0.args.max_num_seq: vLLM has no engine argument 'max_num_seq'" in err
    assert "did you mean 'max_num_seqs'" in err
    assert "engines.1.args.max_model_len:" in err and "100000" in err
    assert "engines.2.args.kv_cache_dtype:" in err and "fp7" in err
    assert "starting on port" not in err  # nothing was launched


def test_a_cpu_kv_cache_too_small_for_max_model_len_is_refused(tmp_path) -> None:
    engine = default_engine()
    engine["env"] = engine["env"] | {"VLLM_CPU_KVCACHE_SPACE": "0.01"}
    done = serve(write_config(tmp_path / "small-kv.yaml", engines=[engine]), tmp_path)
    assert done.returncode == 2
    assert "engines.0.env.VLLM_CPU_KVCACHE_SPACE" in done.stderr
    assert "does NOT fit" in done.stderr and "short by" in done.stderr
    assert "starting on port" not in done.stderr


def test_a_gpu_engine_that_cannot_fit_is_refused_with_the_shortfall(tmp_path) -> None:
    engine = {
        "name": "big",
        "model": "llama-3.3-70b",
        "url": "http://127.0.0.1:1",
        "plan": {"gpu": "h100-80gb", "model_spec": "llama-3.1-70b"},
        "args": {"max_model_len": 8192},
    }
    done = serve(write_config(tmp_path / "big.yaml", engines=[engine]), tmp_path)
    assert done.returncode == 2
    assert "engines.0.args.max_model_len" in done.stderr
    assert "short by 65.13 GiB per device" in done.stderr
    fixed = engine | {
        "args": {"max_model_len": 8192, "quantization": "fp8", "tensor_parallel_size": 2}
    }
    config = tmp_path / "fixed.yaml"
    config.write_text(yaml.safe_dump({"engines": [fixed]}))
    plan = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "memory", "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plan.returncode == 0 and "concurrency at 8,192" in plan.stdout


def test_validation_results_are_cached(tmp_path, monkeypatch) -> None:
    job = {"where": "engines.0", "model_dir": str(tmp_path), "args": {"max_num_seqs": 8}}
    calls = []

    def fake_run(*args, **kwargs):  # a FAKE vLLM check that always passes
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, stdout='{"problems": []}\n', stderr="")

    monkeypatch.setattr(validate.subprocess, "run", fake_run)
    assert validate.validate_engines([job], tmp_path / "cache") == []
    assert validate.validate_engines([job], tmp_path / "cache") == []
    assert len(calls) == 1  # the second start skips the check
    changed = job | {"args": {"max_num_seqs": 9}}
    assert validate.validate_engines([changed], tmp_path / "cache") == []
    assert len(calls) == 2


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ("argument --kv-cache-dtype: invalid choice: 'fp7'", "kv_cache_dtype"),
        ("User-specified max_model_len (100000) is greater than", "max_model_len"),
        ("something else entirely", None),
    ],
)
def test_errors_are_blamed_on_the_argument_they_name(message: str, key: str | None) -> None:
    args = {"kv_cache_dtype": "fp7", "max_model_len": 100000, "max_num_seqs": 4}
    assert validate._blame(message, args) == key


def test_engines_start_on_their_bound_cores() -> None:
    from serving.engines.process import bound_cpus

    assert bound_cpus({"VLLM_CPU_OMP_THREADS_BIND": "1"}) == {1}
    assert bound_cpus({"VLLM_CPU_OMP_THREADS_BIND": "0-1"}) == {0, 1}
    assert bound_cpus({"VLLM_CPU_OMP_THREADS_BIND": "0,2-3"}) == {0, 2, 3}
    for spec in ("auto", "all", "nobind", "0-1|2-3", ""):
        assert bound_cpus({"VLLM_CPU_OMP_THREADS_BIND": spec}) is None
    assert bound_cpus({}) is None


def test_a_tools_tier_that_cannot_serve_tools_fails_at_start(tmp_path) -> None:
    engines = [
        default_engine(
            name="plain", args={"max_model_len": 2048, "enable_auto_tool_choice": False}
        ),
    ]
    tiers = [{"name": "chat", "model": "chat", "engines": ["plain"]}]
    router = {"rules": {"default_tier": "chat", "tools_tier": "chat"}}
    config = write_config(tmp_path / "no-tools.yaml", engines=engines, tiers=tiers, router=router)
    done = serve(config, tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "router.rules.tools_tier: tier 'chat' cannot serve tools: engines.0 (plain)" in (
        done.stderr
    )
    assert "starting on port" not in done.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_tools_tier_serves_tools(name: str) -> None:
    from serving.config import load_settings
    from serving.engines.defaults import tools_tier_problems

    path = REPO / "configs" / name
    if "engines" not in yaml.safe_load(path.read_text()):
        pytest.skip("not a serving config (planner data)")
    assert tools_tier_problems(load_settings(path)) == []
