"""The burst model (a discrete-event simulation of continuous batching) and the real
length table it runs."""

from __future__ import annotations

import random
import statistics
import subprocess
import sys

import pytest

from benchmarks import burst, lengths
from benchmarks.plan import PUBLISHED, published_burst
from benchmarks.roofline import Efficiency, Roofline, Workload
from models.hardware import gpu_profiles, model_specs

SPECS = model_specs()
GPUS = gpu_profiles()
EFF = Efficiency(bandwidth=0.75, compute=0.55, step_overhead_s=0.004)


def h100_8b(quant: str = "none") -> Roofline:
    return Roofline(SPECS["llama-3.1-8b"], GPUS["h100-80gb"], quant, eff=EFF)


def test_the_sharegpt_table_is_real_and_filtered_like_vllm_bench() -> None:
    pairs = lengths.load()
    assert len(pairs) == 20_000
    ins, outs = sorted(a for a, _ in pairs), sorted(b for _, b in pairs)
    assert ins[len(ins) // 2] < 100 < ins[-1]  # short median, long tail
    assert max(outs) > 10 * statistics.median(outs)
    kept = lengths.filtered(pairs)
    assert 0.8 * len(pairs) < len(kept) < len(pairs)
    assert all(4 <= a <= 1024 and b >= 4 and a + b <= 2048 for a, b in kept)
    mi, mo = lengths.means(lengths.rescaled(kept, 217, 199))
    assert mi == pytest.approx(217, rel=0.01) and mo == pytest.approx(199, rel=0.01)


def test_length_specs_parse_and_refuse() -> None:
    capped = lengths.parse("sharegpt:512")
    assert all(a + b <= 512 for a, b in capped.pairs)
    scaled = lengths.parse("sharegpt:0:0.5")
    assert lengths.means(scaled.pairs)[1] < lengths.means(lengths.parse("sharegpt").pairs)[1]
    assert capped.draw(5, seed=3) == capped.draw(5, seed=3)
    for bad in ("nope", "sharegpt:x", "sharegpt:1:y"):
        with pytest.raises(ValueError, match="length"):
            lengths.parse(bad)
    with pytest.raises(ValueError, match="no length pair fits"):
        lengths.parse("sharegpt:3")


def test_one_request_costs_a_prefill_step_and_its_decode_steps() -> None:
    model = h100_8b()
    result = burst.simulate(model, [(100, 10)])
    prefill = model.step(100, 100, 100 * 101 / 2)
    decodes = sum(model.step(1, 100 + j, 100 + j) for j in range(1, 10))
    assert result.duration_s == pytest.approx(prefill + decodes)
    assert result.ttft_s == [pytest.approx(prefill)]
    assert result.steps == 10 and result.preemptions == 0


def test_the_decode_shortcut_changes_nothing() -> None:
    rng = random.Random(1)
    reqs = [(rng.randint(5, 300), rng.randint(1, 200)) for _ in range(60)]
    arrivals = sorted(rng.uniform(0, 0.5) for _ in reqs)
    for kv, when in ((6000, arrivals), (2500, None)):
        limits = burst.EngineLimits(max_num_seqs=16, max_num_batched_tokens=512, kv_tokens=kv)
        fast = burst.simulate(h100_8b(), reqs, limits, when)
        slow = burst.simulate(h100_8b(), reqs, limits, when, stretch=False)
        assert fast.duration_s == pytest.approx(slow.duration_s, rel=1e-9)
        assert fast.ttft_s == pytest.approx(slow.ttft_s, rel=1e-9)
        assert fast.steps == slow.steps and fast.preemptions == slow.preemptions
    assert fast.preemptions > 0  # 2,500 tokens of KV for 16 at once: some were recomputed
    assert fast.requests == 60 and len(fast.tpot_s) == sum(o > 1 for _, o in reqs)


def test_limits_hold() -> None:
    reqs = [(50, 40)] * 100
    r = burst.simulate(h100_8b(), reqs, burst.EngineLimits(max_num_seqs=8))
    assert r.peak_running == 8 and r.requests == 100
    assert r.output_tok_s == pytest.approx(100 * 40 / r.duration_s)
    with pytest.raises(ValueError, match="does not fit the KV cache"):
        burst.simulate(h100_8b(), [(900, 200)], burst.EngineLimits(kv_tokens=1000))
    with pytest.raises(ValueError, match="no requests"):
        burst.simulate(h100_8b(), [])


def test_late_arrivals_wait_for_nothing_and_ttft_counts_from_arrival() -> None:
    r = burst.simulate(h100_8b(), [(20, 5), (20, 5)], arrivals=[0.0, 10.0])
    assert r.duration_s > 10.0
    assert r.ttft_s[0] == pytest.approx(r.ttft_s[1], rel=1e-6)


def test_a_heavy_tailed_burst_is_slower_than_the_steady_model_says() -> None:
    """The point of the model: the same mean lengths, but the burst lasts as long as
    its longest answers while the batch drains."""
    pairs = lengths.rescaled(lengths.filtered(lengths.load()), 217, 199)
    sampler = lengths.PairSampler(pairs)
    model = h100_8b()
    limits = burst.EngineLimits(max_num_seqs=1024)
    rates = [burst.simulate(model, sampler.draw(200, s), limits).req_s for s in range(5)]
    steady = model.predict(Workload(217, 199, 200)).req_s
    assert statistics.median(rates) < 0.5 * steady
    fixed = burst.simulate(model, [(217, 199)] * 200, limits).req_s
    assert statistics.median(rates) < 0.7 * fixed  # same means, no tail: much faster


def test_both_published_figures_within_25_percent_with_the_same_factors() -> None:
    """The burst-model table in benchmarks/RESULTS.md, with the default factors."""
    for row in PUBLISHED:
        predicted = published_burst(row, EFF, samples=10)
        assert predicted == pytest.approx(row["published"], rel=0.25), row["what"]


def test_plan_burst_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "burst", "--model", "llama-3.1-8b",
         "--gpu", "h100-80gb", "--requests", "50", "--samples", "3",
         "--mean-input", "217", "--mean-output", "199"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "50 requests at once" in out and "req/s" in out and "TTFT p50" in out
    bad = subprocess.run(
        [sys.executable, "-m", "serving.cli", "plan", "burst", "--model", "llama-3.1-8b",
         "--gpu", "h100-80gb", "--lengths", "nope"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "unknown length table 'nope'" in bad.stderr
