"""`tiergate plan burst`: what a finite burst of real-length requests gets from one
engine (benchmarks/burst.py), for a GPU that is not here, or replayed against a
`tiergate bench` run to check the model.

    tiergate plan burst --model llama-3.1-8b --gpu h100-80gb --requests 200 \\
        --lengths sharegpt --mean-input 217 --mean-output 199
    tiergate plan burst --bench benchmarks/out/burst/bench.json --model smollm2-135m \\
        --gpu cpu-2core --dtype fp32 --efficiency benchmarks/out/calibration.json \\
        --max-num-seqs 64 --max-num-batched-tokens 2048 --cpu-kv-space 2
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks import burst, lengths
from benchmarks.roofline import Roofline
from models.hardware import GPUProfile, ModelSpec
from models.memory import EngineShape, plan_memory


def limits_for(
    spec: ModelSpec, gpu: GPUProfile, a: argparse.Namespace, max_model_len: int
) -> burst.EngineLimits:
    """The engine's batch limits, and its KV capacity from the memory planner."""
    shape = EngineShape(
        max_model_len=max_model_len,
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens,
        gpu_memory_utilization=a.gpu_memory_utilization,
        kv_cache_dtype=a.kv_cache_dtype,
        tensor_parallel_size=a.tp,
        quantization=a.quant,
        dtype=a.dtype,
        cpu_kvcache_space_gib=a.cpu_kv_space,
    )
    plan = plan_memory(spec, gpu, shape)
    if plan.kv_tokens <= 0:
        raise ValueError(f"{spec.key} leaves no room for a KV cache on {gpu.key}")
    return burst.EngineLimits(
        max_num_seqs=a.max_num_seqs,
        max_num_batched_tokens=a.max_num_batched_tokens or 8192,
        kv_tokens=plan.kv_tokens,
        block_size=plan.block_size,
    )


def sampler_for(a: argparse.Namespace) -> lengths.PairSampler:
    if ":" not in a.lengths and a.lengths.replace("/", "").isdigit():  # IN/OUT fixed
        i, o = (int(x) for x in a.lengths.split("/"))
        return lengths.PairSampler([(i, o)])
    pairs = lengths.filtered(lengths.load(a.lengths))
    if a.mean_input or a.mean_output:
        mi, mo = lengths.means(pairs)
        pairs = lengths.rescaled(pairs, a.mean_input or mi, a.mean_output or mo)
    return lengths.PairSampler(pairs)


def cmd_burst(
    a: argparse.Namespace,
    spec_of: Callable[[str], ModelSpec],
    gpu_of: Callable[[str], GPUProfile],
    model_of: Callable[[ModelSpec, GPUProfile, argparse.Namespace], Roofline],
) -> int:
    spec, gpu = spec_of(a.model), gpu_of(a.gpu)
    model = model_of(spec, gpu, a)
    if a.bench:
        return _replay(a, spec, gpu, model)
    sampler = sampler_for(a)
    longest = max(i + o for i, o in sampler.pairs)
    limits = limits_for(spec, gpu, a, a.max_model_len or longest)
    runs = [
        burst.simulate(model, sampler.draw(a.requests, seed), limits)
        for seed in range(a.seed, a.seed + a.samples)
    ]
    s = burst.summarize(runs)
    mi, mo = lengths.means(sampler.pairs)
    print(
        f"{spec.key} on {gpu.key}, quant {a.quant}: {a.requests} requests at once, lengths "
        f"{a.lengths} (mean {mi:.0f} in / {mo:.0f} out), max_num_seqs {limits.max_num_seqs}, "
        f"{limits.max_num_batched_tokens} tokens per step, KV {limits.kv_tokens:,} tokens; "
        f"{a.samples} sampled bursts"
    )
    print(
        f"req/s {s['req_s']:.2f} (p10 {s['req_s_p10']:.2f}, p90 {s['req_s_p90']:.2f}), "
        f"output tok/s {s['output_tok_s']:,.0f}, burst lasts {s['duration_s']:.1f} s, "
        f"TTFT p50 {s['ttft_p50_s'] * 1000:.0f} ms, TPOT p50 {s['tpot_p50_s'] * 1000:.1f} ms"
    )
    return 0


def _replay(a: argparse.Namespace, spec: ModelSpec, gpu: GPUProfile, model: Roofline) -> int:
    """Each point of a bench run, replayed with its own lengths and send times."""
    doc = json.loads(Path(a.bench).read_text())
    print(
        "| point | requests | measured req/s | predicted | error | measured tok/s | "
        "predicted | TTFT p50 measured / predicted |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p in doc["points"]:
        rows = [r for r in p["requests"] if r["error_kind"] is None and r["completion_tokens"]]
        if not rows:
            continue
        start = min(r["scheduled_s"] for r in rows)
        reqs = [(r["prompt_tokens"], r["completion_tokens"]) for r in rows]
        arrivals = [r["scheduled_s"] - start for r in rows]
        limits = limits_for(spec, gpu, a, a.max_model_len or max(i + o for i, o in reqs))
        sim = burst.simulate(model, reqs, limits, arrivals)
        took = max(r["scheduled_s"] + r["e2e_ms"] / 1000 for r in rows) - start
        rate = len(rows) / took
        out = sum(o for _, o in reqs) / took
        ttft = sorted(r["ttft_ms"] for r in rows)[len(rows) // 2]
        print(
            f"| {p['load']['kind']} {p['load']['value']:g} | {len(rows)} | {rate:.3f} | "
            f"{sim.req_s:.3f} | {sim.req_s / rate - 1:+.0%} | {out:.1f} | "
            f"{sim.output_tok_s:.1f} | {ttft:.0f} / {sim.ttft_p(0.5) * 1000:.0f} ms |"
        )
    return 0


def add_parser(sub, model_args: Callable[[argparse.ArgumentParser], None], func) -> None:
    b = sub.add_parser("burst", help="a finite burst of real-length requests (simulated)")
    model_args(b)
    b.add_argument("--gpu", required=True)
    b.add_argument("--efficiency", type=Path, help="a calibration file from `plan calibrate`")
    b.add_argument("--requests", type=int, default=200, help="requests sent at once")
    b.add_argument(
        "--lengths",
        default="sharegpt",
        help="'sharegpt' (real pairs, filtered as vllm bench does) or IN/OUT fixed",
    )
    b.add_argument("--mean-input", type=float, help="rescale the lengths to this mean")
    b.add_argument("--mean-output", type=float, help="rescale the lengths to this mean")
    b.add_argument("--samples", type=int, default=20, help="bursts drawn; medians reported")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--bench", type=Path, help="replay a bench.json's requests instead")
    b.add_argument("--max-num-seqs", type=int, default=1024, help="vLLM's default on H100")
    b.add_argument("--max-num-batched-tokens", type=int, default=8192)
    b.add_argument("--max-model-len", type=int, help="default: the longest request")
    b.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    b.add_argument("--cpu-kv-space", type=float, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    b.set_defaults(func=func)
