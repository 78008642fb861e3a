"""CPU engine settings side by side: each variant of configs/default.yaml is started with
`tiergate serve`, loaded at C=1 and C=32 with `tiergate bench`'s runner, and stopped;
the variants run in ABBA order (A B C C B A ...) so that drift hits each alike.

    python -m benchmarks.studies.cpu_tuning --variants baseline compiled --passes 2

Reports, per variant, the golden-set gate score (`tiergate eval`), and the median over passes
of output tok/s at C=1 and C=32 and TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
from pathlib import Path

import yaml

from benchmarks.client import Target
from benchmarks.datasets import LengthDist, SyntheticText, synthetic
from benchmarks.launch import REPO, GatewayProcess, exit_on_sigterm
from benchmarks.metrics import summarize
from benchmarks.quality.evaluate import answers, golden_report
from benchmarks.quality.scoring import load_golden
from benchmarks.runner import Load, run

DEFAULT = REPO / "configs" / "default.yaml"

# name -> (args changes, env changes, model). None removes a key.
VARIANTS: dict[str, tuple[dict, dict, str | None]] = {
    "baseline": ({}, {}, None),
    "compiled": ({"enforce_eager": None}, {}, None),
    "batched-512": ({"max_num_batched_tokens": 512}, {}, None),
    "fp32": ({"dtype": "float32"}, {}, None),
    "bf16": ({"dtype": "bfloat16"}, {}, None),
    # block_size 16 steers vLLM-CPU's attention off its AMX kernel ("vec16"; cpu_attn.py)
    "bf16-block16": ({"dtype": "bfloat16", "block_size": 16}, {}, None),
    "bf16-compiled": ({"dtype": "bfloat16", "enforce_eager": None}, {}, None),
    "fp32-compiled": ({"dtype": "float32", "enforce_eager": None}, {}, None),
    "kv-1g": ({}, {"VLLM_CPU_KVCACHE_SPACE": "1"}, None),
    "int8-w8a8": ({}, {}, "smollm2-135m-instruct-w8a8"),
    "int8-w8a8-fp32": ({"dtype": "float32"}, {}, "smollm2-135m-instruct-w8a8"),
    "int8-w8a8-compiled": ({"enforce_eager": None}, {}, "smollm2-135m-instruct-w8a8"),
}


def variant_config(name: str, folder: Path) -> Path:
    data = yaml.safe_load(DEFAULT.read_text())
    engine = data["engines"][0]
    args, env, model = VARIANTS[name]
    for target, changes in ((engine["args"], args), (engine["env"], env)):
        for k, v in changes.items():
            if v is None:
                target.pop(k, None)
            else:
                target[k] = v
    if model:
        engine["model"] = model
        engine["served_model_name"] = "smollm2-135m-instruct"
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def measure(url: str, text: SyntheticText, seed: int) -> dict:
    target = Target(url, "smollm2-135m-instruct")
    items = load_golden()
    got = await answers(url, target.model, items, 48, 8, None, 120)
    gate = golden_report(items, got, 0.8)
    out = {"gate_score": gate["score"]}
    failed = [
        f"{r['id']}: {' '.join(r['text'].split())[:60]!r}" for r in gate["items"] if not r["passed"]
    ]
    print("gate failures:\n  " + "\n  ".join(failed), flush=True)
    for c, n, tokens in ((1, 4, 128), (32, 64, 128)):
        sessions = synthetic(
            text, n, LengthDist.parse("128"), LengthDist.parse(str(tokens)), seed=seed + c
        )
        result = await run(target, sessions, Load("concurrency", c, count=n))
        t0, t1 = result.window
        s = summarize(result.records, t0, t1)
        out[f"c{c}_tok_s"] = s["output_tok_s"]
        out[f"c{c}_ttft_ms"] = s["ttft_ms"]["p50"]
        out[f"c{c}_errors"] = s["requests"] - s["completed"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["baseline", "compiled", "batched-512"])
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    from transformers import AutoTokenizer

    from serving.config import Settings

    tok_dir = Settings.model_fields["model_cache"].default_factory() / "smollm2-135m-instruct"
    text = SyntheticText(AutoTokenizer.from_pretrained(tok_dir))
    work = Path(tempfile.mkdtemp(prefix="tiergate-cpu-tuning-"))
    results: dict[str, list[dict]] = {v: [] for v in a.variants}
    order = list(
        itertools.chain.from_iterable(
            a.variants if i % 2 == 0 else a.variants[::-1] for i in range(a.passes)
        )
    )
    for i, name in enumerate(order):
        config = variant_config(name, work)
        with GatewayProcess(config, work / f"{name}-{i}.log") as gw:
            gw.wait_ready()
            r = asyncio.run(measure(gw.url, text, seed=1000 * i))
        results[name].append(r)
        print(
            f"{name} (run {i + 1}/{len(order)}): "
            + ", ".join(f"{k} {v:.1f}" for k, v in r.items()),
            flush=True,
        )
    print("| variant | gate score | C=1 out tok/s | C=32 out tok/s | C=32 TTFT p50 ms | runs |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(
            f"| {name} | {med['gate_score']:.0%} | {med['c1_tok_s']:.1f} | "
            f"{med['c32_tok_s']:.1f} | {med['c32_ttft_ms']:.0f} | {len(rs)} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
