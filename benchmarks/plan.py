"""`tiergate plan`: how many replicas and GPUs for a traffic profile, at what cost; what an
NVIDIA GPU would serve (roofline), fitted to measured runs; and whether a model fits.

    tiergate plan capacity --bench benchmarks/out/sweep/bench.json --peak-rps 40 \\
        --headroom 0.3 --usd-per-gpu-hour 2.50
    tiergate plan predict --model llama-3.1-8b --gpu h100-80gb --quant fp8 --input 128 --output 128
    tiergate plan calibrate --bench benchmarks/out/sweep/bench.json --model smollm2-135m \\
        --gpu cpu-2core --dtype fp32
    tiergate plan memory --model llama-3.1-70b --gpu h100-80gb --quant fp8 --tp 2 \\
        --max-model-len 8192
    tiergate plan memory --config configs/gpu-h100.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from benchmarks import burst, plan_burst
from benchmarks.capacity import cost, find_limit, mix_factor, replicas_needed
from benchmarks.roofline import Efficiency, Observation, Roofline, Workload, calibrate
from models.hardware import GPUProfile, ModelSpec, gpu_profiles, lookup, model_specs
from models.memory import EngineShape, plan_memory

# Published figures the roofline is checked against (benchmarks/RESULTS.md).
PUBLISHED = [
    {
        "what": "vLLM CI: Llama-3.1-8B bf16, TP1, ShareGPT (~217 in / ~199 out), burst",
        "model": "llama-3.1-8b",
        "gpu": "h100-80gb",
        "quant": "none",
        "input": 217,
        "output": 199,
        "concurrency": 200,
        "metric": "req_s",
        "published": 19.5,
        # the run itself: 200 ShareGPT prompts sent at once, vLLM's H100 defaults
        "burst": {"requests": 200, "lengths": "sharegpt", "max_num_seqs": 1024},
    },
    {
        "what": "NVIDIA: Llama-3.1-8B FP8, 128 in / 128 out, max throughput (TensorRT-LLM)",
        "model": "llama-3.1-8b",
        "gpu": "h100-80gb",
        "quant": "fp8",
        "input": 128,
        "output": 128,
        "concurrency": 1024,
        "metric": "output_tok_s",
        "published": 27569.0,
        # trtllm-bench queues 30,000 requests of 128/128 at once (perf-overview.md)
        "burst": {"requests": 30000, "lengths": "128/128", "max_num_seqs": 1024},
    },
]


def _spec(name: str) -> ModelSpec:
    path = Path(name)
    if path.suffix == ".json" or (path / "config.json").is_file():
        return ModelSpec.from_config_json(path if path.suffix == ".json" else path / "config.json")
    return lookup(model_specs(), name, "model")


def _gpus(name: str) -> list[GPUProfile]:
    table = gpu_profiles()
    if name == "all":
        return [g for g in table.values() if g.arch != "cpu"]
    return [lookup(table, name, "GPU")]


def _dtype_bytes(dtype: str) -> float:
    return 4.0 if dtype in ("fp32", "float32") else 2.0


def _load_efficiency(path: Path | None) -> Efficiency:
    if path is None:
        return Efficiency()
    return Efficiency(**json.loads(path.read_text())["efficiency"])


def cmd_capacity(a: argparse.Namespace) -> int:
    doc = json.loads(a.bench.read_text())
    limit = find_limit(doc["points"], a.goodput_target, a.require_pass)
    slo = doc["meta"]["slo"]
    unit = "concurrency" if doc["meta"]["load_kind"] == "concurrency" else "req/s offered"
    print(
        f"SLO: {slo}; a point passes when >= {a.goodput_target:.0%} of requests meet it"
        + (" and its verdict is pass" if a.require_pass else "")
    )
    for p in sorted(doc["points"], key=lambda p: p["load"]["value"]):
        s = p["summary"]
        print(
            f"  {p['load']['value']:>8g} {unit}: goodput {s['goodput_share']:.0%}, "
            f"{s['req_s']:.2f} req/s, {s['output_tok_s']:.1f} out tok/s, verdict "
            f"{p['verdict']['status']}"
        )
    if limit.last_pass is None:
        print("No load point met the SLO: even the lightest load is too much for one replica.")
        return 1
    lp = limit.last_pass
    print(
        f"Max sustainable per replica: {lp['load']['value']:g} {unit} "
        f"({limit.per_replica_req_s:.2f} req/s, {limit.per_replica_output_tok_s:.1f} out tok/s)"
    )
    if limit.first_fail is None:
        print("  (the sweep never failed: the true limit is higher; extend the sweep)")
    else:
        ff = limit.first_fail
        print(
            f"First failing point: {ff['load']['value']:g} {unit} "
            f"(goodput {ff['summary']['goodput_share']:.0%})"
        )
    bench_out = lp["summary"]["mean_output_tokens"]
    factor = mix_factor(bench_out, a.output_tokens)
    per_replica = limit.per_replica_req_s * factor
    if factor != 1.0:
        print(
            f"Traffic averages {a.output_tokens:g} output tokens vs {bench_out:.0f} measured: "
            f"capacity scaled x{factor:.2f} to {per_replica:.2f} req/s per replica"
        )
    if a.peak_rps is None:
        return 0
    n = replicas_needed(a.peak_rps, per_replica, a.headroom)
    gpus = n * a.gpus_per_replica
    print(
        f"Peak {a.peak_rps:g} req/s with {a.headroom:.0%} headroom: {n} replica(s) = "
        f"{gpus} GPU(s) ({a.gpus_per_replica} per replica)"
    )
    if a.usd_per_gpu_hour is not None:
        out_tokens = a.output_tokens or bench_out
        c = cost(
            a.usd_per_gpu_hour,
            a.gpus_per_replica,
            n,
            a.peak_rps,
            out_tokens,
            limit.per_replica_output_tok_s,
        )
        print(
            f"Cost at ${a.usd_per_gpu_hour:g}/GPU-hour: ${c.usd_per_hour:.2f}/hour, "
            f"${c.usd_per_month:,.0f}/month; at peak traffic ${c.usd_per_1m_output_tokens:.2f} "
            f"per 1M output tokens, ${c.usd_per_1k_requests:.3f} per 1k requests; "
            f"${c.usd_per_1m_output_tokens_at_limit:.2f} per 1M output tokens for a replica "
            "run at its SLO limit"
        )
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    spec = _spec(a.model)
    eff = _load_efficiency(a.efficiency)
    print(
        f"{spec.key}: {spec.params / 1e9:.2f} B params, quant {a.quant}, TP {a.tp}, "
        f"in {a.input} / out {a.output}, efficiency {asdict(eff)}"
    )
    print("| GPU | C (KV-limited) | out tok/s | req/s | TTFT ms | TPOT ms | decode bound |")
    print("|---|---|---|---|---|---|---|")
    for gpu in _gpus(a.gpu):
        model = _roofline(spec, gpu, a)
        shape = EngineShape(
            max_model_len=a.input + a.output,
            quantization=a.quant,
            kv_cache_dtype=a.kv_cache_dtype,
            tensor_parallel_size=a.tp,
            max_num_seqs=max(a.concurrency),
            dtype=a.dtype,
        )
        cap = model.max_concurrency(shape, a.input + a.output)
        for c in a.concurrency:
            p = model.predict(Workload(a.input, a.output, c), cap)
            print(
                f"| {gpu.key} | {p.concurrency} | {p.output_tok_s:,.0f} | {p.req_s:.2f} | "
                f"{p.ttft_s * 1000:.1f} | {p.tpot_s * 1000:.2f} | {p.bound} |"
            )
    return 0


def observations(doc: dict) -> list[Observation]:
    """Closed-loop points of a bench run, with the lengths the server reported."""
    obs = []
    for p in doc["points"]:
        s = p["summary"]
        if p["load"]["kind"] != "concurrency" or not s["completed"]:
            continue
        w = Workload(s["mean_input_tokens"], s["mean_output_tokens"], int(p["load"]["value"]))
        obs.append(Observation(w, s["output_tok_s"]))
    return obs


def cmd_calibrate(a: argparse.Namespace) -> int:
    spec = _spec(a.model)
    gpu = _gpus(a.gpu)[0]
    model = _roofline(spec, gpu, a)  # the default factors: the fit starts from them
    obs = [o for path in a.bench for o in observations(json.loads(path.read_text()))]
    before = [model.predict(o.workload).output_tok_s for o in obs]
    eff, rms = calibrate(model, obs)
    fitted = model.with_efficiency(eff)
    print(f"fitted {asdict(eff)} (RMS relative error {rms:.1%}) from {len(obs)} points")
    print("| C | in | out | measured tok/s | default model | calibrated |")
    print("|---|---|---|---|---|---|")
    for o, b in zip(obs, before, strict=True):
        f = fitted.predict(o.workload).output_tok_s
        print(
            f"| {o.workload.concurrency} | {o.workload.input_tokens:.0f} | "
            f"{o.workload.output_tokens:.0f} | {o.output_tok_s:.1f} | {b:.1f} | {f:.1f} |"
        )
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "model": spec.key,
                    "gpu": gpu.key,
                    "quant": a.quant,
                    "efficiency": asdict(eff),
                    "rms_error": rms,
                },
                indent=1,
            )
        )
        print(f"wrote {a.out}")
    return 0


def _roofline(spec: ModelSpec, gpu: GPUProfile, a: argparse.Namespace) -> Roofline:
    return Roofline(
        spec,
        gpu,
        a.quant,
        tp=a.tp,
        kv_cache_dtype=a.kv_cache_dtype,
        dtype_bytes=_dtype_bytes(a.dtype),
        eff=_load_efficiency(getattr(a, "efficiency", None)),
    )


def cmd_burst(a: argparse.Namespace) -> int:
    return plan_burst.cmd_burst(a, _spec, lambda name: _gpus(name)[0], _roofline)


def published_burst(row: dict, eff: Efficiency, samples: int = 20) -> float:
    """The row's figure from the burst simulation, run the way the figure was measured:
    its request count and lengths (ShareGPT rescaled to the run's reported means)."""
    b = row["burst"]
    spec, gpu = _spec(row["model"]), _gpus(row["gpu"])[0]
    a = argparse.Namespace(
        quant=row["quant"], tp=1, kv_cache_dtype="auto", dtype="bf16", efficiency=None,
        lengths=b["lengths"], mean_input=row["input"], mean_output=row["output"],
        max_num_seqs=b["max_num_seqs"], max_num_batched_tokens=8192,
        gpu_memory_utilization=0.9, cpu_kv_space=None,
    )  # fmt: skip
    model = _roofline(spec, gpu, a).with_efficiency(eff)
    sampler = plan_burst.sampler_for(a)
    fixed = len(sampler.pairs) == 1
    longest = max(i + o for i, o in sampler.pairs)
    limits = plan_burst.limits_for(spec, gpu, a, longest)
    runs = [
        burst.simulate(model, sampler.draw(b["requests"], seed), limits)
        for seed in range(1 if fixed else samples)
    ]
    return burst.summarize(runs)[row["metric"]]


def cmd_published(a: argparse.Namespace) -> int:
    eff = _load_efficiency(a.efficiency)
    print("| published figure | metric | published | steady model | error | burst model | error |")
    print("|---|---|---|---|---|---|---|")
    for row in PUBLISHED:
        spec, gpu = _spec(row["model"]), _gpus(row["gpu"])[0]
        model = Roofline(spec, gpu, row["quant"], eff=eff)
        p = model.predict(Workload(row["input"], row["output"], row["concurrency"]))
        value = getattr(p, row["metric"])
        des = published_burst(row, eff)
        print(
            f"| {row['what']} | {row['metric']} | {row['published']:,} | {value:,.1f} | "
            f"{value / row['published'] - 1:+.0%} | {des:,.1f} | "
            f"{des / row['published'] - 1:+.0%} |"
        )
    return 0


def cmd_memory(a: argparse.Namespace) -> int:
    if a.config:
        from serving.config import load_settings
        from serving.engines.memory_check import check_settings

        problems = check_settings(load_settings(a.config), verbose=print)
        return 1 if problems else 0
    if not a.model:
        raise SystemExit("tiergate plan memory: error: give --model (or --config)")
    spec = _spec(a.model)
    ok = True
    for gpu in _gpus(a.gpu):
        shape = EngineShape(
            max_model_len=a.max_model_len,
            max_num_seqs=a.max_num_seqs,
            max_num_batched_tokens=a.max_num_batched_tokens,
            gpu_memory_utilization=a.gpu_memory_utilization,
            kv_cache_dtype=a.kv_cache_dtype,
            tensor_parallel_size=a.tp,
            pipeline_parallel_size=a.pp,
            quantization=a.quant,
            dtype=a.dtype,
            cpu_kvcache_space_gib=a.cpu_kv_space,
        )
        plan = plan_memory(spec, gpu, shape)
        ok &= plan.fits
        print(plan.explain())
        if plan.fits and a.context:
            print(f"  sequences of {a.context:,} tokens at once: {plan.sequences_at(a.context):,}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiergate plan", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("capacity", help="replicas and cost from a bench sweep")
    c.add_argument("--bench", type=Path, required=True, help="bench.json of a sweep")
    c.add_argument(
        "--goodput-target",
        type=float,
        default=0.95,
        help="share of requests that must meet the SLO (default 0.95)",
    )
    c.add_argument("--require-pass", action="store_true", help="also need a pass verdict")
    c.add_argument("--peak-rps", type=float, help="peak traffic, requests/s")
    c.add_argument("--output-tokens", type=float, help="traffic's mean output tokens")
    c.add_argument("--headroom", type=float, default=0.3, help="spare share at peak")
    c.add_argument("--gpus-per-replica", type=int, default=1)
    c.add_argument("--usd-per-gpu-hour", type=float)
    c.set_defaults(func=cmd_capacity)

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", help="a key of configs/model_specs.yaml or a config.json")
        q.add_argument("--quant", default="none")
        q.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
        q.add_argument("--kv-cache-dtype", default="auto")
        q.add_argument("--tp", type=int, default=1)

    r = sub.add_parser("predict", help="roofline prediction on NVIDIA GPUs")
    model_args(r)
    r.add_argument("--gpu", default="all")
    r.add_argument("--input", type=int, default=128)
    r.add_argument("--output", type=int, default=128)
    r.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    r.add_argument("--efficiency", type=Path, help="a calibration file from `plan calibrate`")
    r.set_defaults(func=cmd_predict)

    k = sub.add_parser("calibrate", help="fit the roofline's efficiency factors to runs")
    model_args(k)
    k.add_argument("--gpu", required=True)
    k.add_argument("--bench", type=Path, nargs="+", required=True)
    k.add_argument("--out", type=Path)
    k.set_defaults(func=cmd_calibrate)

    plan_burst.add_parser(sub, model_args, cmd_burst)

    u = sub.add_parser("published", help="the roofline against published figures")
    u.add_argument("--efficiency", type=Path)
    u.set_defaults(func=cmd_published)

    m = sub.add_parser("memory", help="weights, KV cache and max sequences; does it fit?")
    model_args(m)
    m.add_argument("--config", type=Path, help="check every engine of a tiergate config")
    m.add_argument("--gpu", default="all")
    m.add_argument("--pp", type=int, default=1)
    m.add_argument("--max-model-len", type=int, default=8192)
    m.add_argument("--max-num-seqs", type=int, default=256)
    m.add_argument("--max-num-batched-tokens", type=int)
    m.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    m.add_argument("--cpu-kv-space", type=float, help="VLLM_CPU_KVCACHE_SPACE, GiB")
    m.add_argument("--context", type=int, help="also report sequences of this length")
    m.set_defaults(func=cmd_memory)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"tiergate plan: error: {exc}", file=sys.stderr)
        return 2
