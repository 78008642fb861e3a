"""Check `tiergate plan`'s roofline against a real NVIDIA GPU.

Two halves, because the GPU machine has torch and transformers but not our install:

  measure PART  (on the GPU, torch + transformers + pyyaml only): the card's memory bandwidth
           (copy and read), its dense GEMM rates (bf16, fp16, fp8, int8), and decode
           tok/s of models built from configs/model_specs.yaml with random weights (same
           shapes, same cost) through transformers: eager `generate`, and one decode step
           replayed from a CUDA graph (what vLLM does) where capture works.
  compare  (here): the roofline's prediction for each measured point, with the datasheet
           peaks and default efficiency, and with the measured peaks, side by side; and a
           fit of its bandwidth share and per-step overhead to the graph steps
           (`--fit-out`: a file for `tiergate plan ... --efficiency`).

    for part in peaks hf graph; do                                           # on the GPU
      python -m benchmarks.studies.gpu_check measure $part --out gpu_$part.json; done
    python -m benchmarks.studies.gpu_check compare gpu_*.json --gpu h100-80gb
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the measure half runs where only torch is
    from benchmarks.roofline import Efficiency, StepTiming
    from models.hardware import GPUProfile

SPECS = Path(__file__).resolve().parents[2] / "configs" / "model_specs.yaml"


def _timed(fn, reps: int, warmup: int = 3) -> float:
    """Median seconds of `fn` over `reps` runs, timed with CUDA events."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def measure_memory() -> dict:
    import torch

    n = 2 * 1024**3 // 2  # 2 GiB of bf16, far past the 50 MB L2
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    copy_s = _timed(lambda: b.copy_(a), 20)
    read_s = _timed(lambda: a.sum(dtype=torch.float32), 20)
    return {"copy_gbs": 2 * 2 * n / copy_s / 1e9, "read_gbs": 2 * n / read_s / 1e9}


def measure_gemm(size: int = 8192) -> dict:
    import torch

    out: dict[str, float | str] = {}
    flops = 2 * size**3
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x = torch.randn(size, size, device="cuda", dtype=dtype)
        y = torch.randn(size, size, device="cuda", dtype=dtype)
        out[f"{name}_tflops"] = flops / _timed(lambda x=x, y=y: x @ y, 20) / 1e12
    try:
        x8 = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
        y8 = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn).t()  # column-major
        one = torch.tensor(1.0, device="cuda")
        fp8 = lambda: torch._scaled_mm(x8, y8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)  # noqa: E731
        out["fp8_tflops"] = flops / _timed(fp8, 20) / 1e12
    except Exception as exc:  # an older torch or card: say so, measure the rest
        out["fp8_tflops"] = f"n/a: {exc.__class__.__name__}: {str(exc)[:120]}"
    try:
        xi = torch.randint(-128, 127, (size, size), device="cuda", dtype=torch.int8)
        yi = torch.randint(-128, 127, (size, size), device="cuda", dtype=torch.int8)
        out["int8_tops"] = flops / _timed(lambda: torch._int_mm(xi, yi), 20) / 1e12
    except Exception as exc:
        out["int8_tops"] = f"n/a: {exc.__class__.__name__}: {str(exc)[:120]}"
    torch.cuda.empty_cache()
    return out


def _hf_config(spec: dict):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=spec["hidden"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=spec["head_dim"],
        intermediate_size=spec["intermediate"],
        vocab_size=spec["vocab"],
        tie_word_embeddings=spec.get("tied_embeddings", False),
        max_position_embeddings=4096,
    )
    if spec.get("qkv_bias"):
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def _graph_decode(
    spec: dict, batch: int, prompt: int, output: int, device: str = "cuda", attend: bool = True
) -> float:
    """Seconds per decode step of a plain-torch Llama decoder (random bf16 weights of the
    spec's shapes, a static KV cache, GQA attention over it), one step captured in a CUDA
    graph and replayed: the launch-free cost that an engine with CUDA graphs (vLLM) pays.
    Rotary embedding is left out (elementwise, no weights). `attend=False` skips the
    attention (K/V still written): the step's cost without it, to tell the two apart."""
    import torch
    import torch.nn.functional as F

    hid, d = spec["hidden"], spec["head_dim"]
    nh, kvh, inter, layers = spec["heads"], spec["kv_heads"], spec["intermediate"], spec["layers"]
    tmax = prompt + output
    w = dict(dtype=torch.bfloat16, device=device)
    rnd = lambda *shape: torch.randn(*shape, **w) * 0.02  # noqa: E731
    qkv = [rnd(hid, (nh + 2 * kvh) * d) for _ in range(layers)]
    wo = [rnd(nh * d, hid) for _ in range(layers)]
    gate_up = [rnd(hid, 2 * inter) for _ in range(layers)]
    down = [rnd(inter, hid) for _ in range(layers)]
    norms = torch.ones(2 * layers + 1, hid, **w)
    emb = rnd(spec["vocab"], hid)
    head = emb if spec.get("tied_embeddings") else rnd(spec["vocab"], hid)
    kcache = torch.zeros(layers, batch, kvh, tmax, d, **w)
    vcache = torch.zeros_like(kcache)
    ids = torch.randint(0, spec["vocab"], (batch,), device=device)
    pos = torch.tensor([prompt], device=device)
    span = torch.arange(tmax, device=device)

    def step() -> None:
        h = emb[ids]
        mask = (span <= pos).view(1, 1, 1, tmax)
        for i in range(layers):
            a = F.rms_norm(h, (hid,), norms[2 * i])
            q, k, v = (a @ qkv[i]).split([nh * d, kvh * d, kvh * d], dim=-1)
            kcache[i].index_copy_(2, pos, k.view(batch, kvh, 1, d))
            vcache[i].index_copy_(2, pos, v.view(batch, kvh, 1, d))
            if attend:
                o = F.scaled_dot_product_attention(
                    q.view(batch, nh, 1, d), kcache[i], vcache[i], attn_mask=mask, enable_gqa=True
                )
            else:
                o = q
            h = h + o.reshape(batch, nh * d) @ wo[i]
            g, u = (F.rms_norm(h, (hid,), norms[2 * i + 1]) @ gate_up[i]).chunk(2, dim=-1)
            h = h + (F.silu(g) * u) @ down[i]
        logits = F.rms_norm(h, (hid,), norms[-1]) @ head.t()
        ids.copy_(logits.argmax(-1))
        pos.add_(1)

    if device != "cuda":  # a dry run of the arithmetic (CPU), no graph
        step()
        return float("nan")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        step()

    def replay_all() -> None:
        pos.fill_(prompt)
        for _ in range(output):
            graph.replay()

    return _timed(replay_all, 5, warmup=2) / output


def measure_graph(
    names: list[str], batches: list[int], prompt: int, output: int, attend: bool = True
) -> list[dict]:
    import torch
    import yaml

    specs = yaml.safe_load(SPECS.read_text())["models"]
    rows = []
    for name in names:
        for batch in batches:
            step = _graph_decode(specs[name], batch, prompt, output, attend=attend)
            row = {
                "model": name,
                "batch": batch,
                "prompt": prompt,
                "output": output,
                "graph_step_s": step,
                "graph_tok_s": batch / step,
                "attention": attend,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def measure_decode(names: list[str], batches: list[int], prompt: int, output: int) -> list[dict]:
    import torch
    import yaml
    from transformers import AutoModelForCausalLM

    specs = yaml.safe_load(SPECS.read_text())["models"]
    rows = []
    for name in names:
        cfg = _hf_config(specs[name])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(
                cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
            ).eval()
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        for batch in batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device="cuda")
            mask = torch.ones_like(ids)

            def gen(n: int, model=model, ids=ids, mask=mask) -> None:
                with torch.no_grad():
                    model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        eos_token_id=None,
                        pad_token_id=0,
                    )

            prefill_s = _timed(lambda: gen(1), 3, warmup=1)
            full_s = _timed(lambda: gen(output), 2, warmup=1)
            eager_step = (full_s - prefill_s) / (output - 1)
            row = {
                "model": name,
                "weights_gb": weights / 1e9,
                "batch": batch,
                "prompt": prompt,
                "output": output,
                "prefill_s": prefill_s,
                "eager_step_s": eager_step,
                "eager_tok_s": batch / eager_step,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
        torch.cuda.empty_cache()
    return rows


def cmd_measure(args: argparse.Namespace) -> int:
    import torch
    import transformers

    props = torch.cuda.get_device_properties(0)
    result: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": props.name,
        "sms": props.multi_processor_count,
        "memory_gib": props.total_memory / 1024**3,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.part == "peaks":
        result["memory"] = measure_memory()
        result["gemm"] = measure_gemm()
    elif args.part == "hf":
        result["hf"] = measure_decode(args.models, args.batches, args.prompt, args.output)
    else:
        result["graph"] = measure_graph(
            args.models, args.batches, args.prompt, args.output, attend=not args.no_attention
        )
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k in ("memory", "gemm")}))
    return 0


def _fit(
    args: argparse.Namespace,
    data: dict,
    gpu: GPUProfile,
    rows: list[dict],
    timings: list[StepTiming],
    compute: float,
) -> Efficiency | None:
    """Fit the bandwidth share and step overhead to the graph steps (batch <= --fit-max-batch,
    with attention, not --held-out); print it, and write it as a `plan --efficiency` file
    with --fit-out. None when no step qualifies."""
    from benchmarks.roofline import fit_steps

    fitted_on = [
        t
        for t, r in zip(timings, rows, strict=True)
        if t.batch <= args.fit_max_batch
        and r["model"] not in args.held_out
        and r.get("attention", True)
    ]
    fit, rms = fit_steps(fitted_on, compute) if fitted_on else (None, float("nan"))
    if fit:
        held = ", ".join(args.held_out) or "none"
        print(
            f"\nfit to the CUDA-graph steps at batch <= {args.fit_max_batch} "
            f"({len(fitted_on)} points; held out: {held}): "
            f"bandwidth {fit.bandwidth:.2f} of the datasheet "
            f"({fit.bandwidth * gpu.bandwidth_gbs:,.0f} GB/s), step overhead "
            f"{fit.step_overhead_s * 1e3:.2f} ms, compute {fit.compute:.2f} (measured); "
            f"RMS error {rms:.1%}"
        )
    if fit and args.fit_out:
        args.fit_out.write_text(
            json.dumps(
                {
                    "what": "the CUDA-graph decode floor of a plain-torch decoder, not vLLM",
                    "device": data["device"],
                    "date": data["date"],
                    "gpu": args.gpu,
                    "efficiency": asdict(fit),
                    "rms_error": rms,
                    "points": len(fitted_on),
                },
                indent=1,
            )
        )
    return fit


def cmd_compare(args: argparse.Namespace) -> int:
    from benchmarks.roofline import Efficiency, Roofline, StepTiming
    from models.hardware import gpu_profiles, model_specs

    data: dict = {}
    for f in args.files:  # one file per part (peaks, hf, graph); a part's rows may span files
        for key, value in json.loads(Path(f).read_text()).items():
            data[key] = data.get(key, []) + value if isinstance(value, list) else value
    gpu = gpu_profiles()[args.gpu]
    specs = model_specs()
    mem, gemm = data["memory"], data["gemm"]
    print(
        f"{data['device']} ({data['date']}, torch {data['torch']}, "
        f"transformers {data['transformers']})"
    )
    print(
        f"memory: copy {mem['copy_gbs']:.0f} GB/s, read {mem['read_gbs']:.0f} GB/s "
        f"= {mem['copy_gbs'] / gpu.bandwidth_gbs:.2f} / {mem['read_gbs'] / gpu.bandwidth_gbs:.2f}"
        f" of the datasheet's {gpu.bandwidth_gbs:.0f}"
    )
    sheet = {
        "bf16_tflops": gpu.bf16_tflops,
        "fp16_tflops": gpu.bf16_tflops,
        "fp8_tflops": gpu.fp8_tflops,
        "int8_tops": gpu.int8_tops,
    }
    for key, value in gemm.items():
        if isinstance(value, str):
            print(f"  {key}: {value}")
        else:
            share = value / sheet[key]
            print(f"  {key}: {value:.0f} = {share:.2f} of the datasheet's {sheet[key]:.0f}")
    # The roofline with the measured ceilings and no loss: the physical floor.
    floor = Efficiency(
        bandwidth=mem["read_gbs"] / gpu.bandwidth_gbs,
        compute=gemm["bf16_tflops"] / gpu.bf16_tflops,
        step_overhead_s=0.0,
    )
    hf = {(r["model"], r["batch"]): r for r in data.get("hf", [])}
    rows = data.get("graph", [])
    models = {name: Roofline(specs[name], gpu) for name in {r["model"] for r in rows}}
    # A step without attention (--no-attention) reads no K/V: context 0, never fitted.
    timings = [
        StepTiming(
            models[r["model"]],
            r["batch"],
            r["prompt"] + r["output"] / 2 if r.get("attention", True) else 0,
            r["graph_step_s"],
        )
        for r in rows
    ]
    fit = _fit(args, data, gpu, rows, timings, floor.compute)
    print(
        "\n| model | batch | transformers eager tok/s | CUDA graph tok/s | roofline, default "
        "efficiency | floor: measured peaks, no overhead | fitted | graph / roofline | "
        "graph / floor | fitted / graph |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row, t in zip(rows, timings, strict=True):
        model = models[row["model"]]
        default_step, _ = model.decode_step(t.batch, t.context)
        floor_step, bound = model.with_efficiency(floor).decode_step(t.batch, t.context)
        pred, best = t.batch / default_step, t.batch / floor_step
        fitted = (
            t.batch / model.with_efficiency(fit).decode_step(t.batch, t.context)[0]
            if fit
            else float("nan")
        )
        graph = row["graph_tok_s"]
        eager = hf.get((row["model"], row["batch"]), {}).get("eager_tok_s", float("nan"))
        name = row["model"] if row.get("attention", True) else f"{row['model']} (no attention)"
        print(
            f"| {name} | {row['batch']} | {eager:,.0f} | {graph:,.0f} | {pred:,.0f} | "
            f"{best:,.0f} ({bound}) | {fitted:,.0f} | {graph / pred:.2f} | {graph / best:.2f} | "
            f"{fitted / graph:.2f} |"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("part", choices=["peaks", "hf", "graph"])
    m.add_argument("--out", default="gpu_check.json")
    m.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-3.2-3b", "llama-3.1-8b"])
    m.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    m.add_argument("--prompt", type=int, default=128)
    m.add_argument("--output", type=int, default=128)
    m.add_argument("--no-attention", action="store_true", help="graph: skip attention")
    c = sub.add_parser("compare")
    c.add_argument("files", nargs="+")
    c.add_argument("--gpu", default="h100-80gb")
    c.add_argument(
        "--fit-max-batch", type=int, default=32, help="fit to the graph steps up to this batch"
    )
    c.add_argument("--held-out", nargs="*", default=[], help="models shown but not fitted")
    c.add_argument("--fit-out", type=Path, help="write the fit as a `plan --efficiency` file")
    args = parser.parse_args(argv)
    return cmd_measure(args) if args.cmd == "measure" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
