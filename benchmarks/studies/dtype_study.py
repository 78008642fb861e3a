"""Is a dtype's answer drift a bug or rounding? Greedy answers to the golden set from
transformers (float32 and bfloat16, same weights, same chat template) and from running
engines, each scored by the golden set and compared with transformers-float32 as truth.

    python -m benchmarks.studies.dtype_study --engine vllm-fp32=http://127.0.0.1:8101 \\
        --engine vllm-bf16=http://127.0.0.1:8102 --out benchmarks/out/dtype_study.json

If an engine's bf16 strays from the float32 truth about as far as transformers' own bf16
does, the drift is bf16 rounding on a small model; if much further, it is the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
from pathlib import Path

from benchmarks.quality.evaluate import answers, golden_report
from benchmarks.quality.scoring import agreement, load_golden

MODEL = "smollm2-135m-instruct"


def hf_answers(folder: Path, dtype: str, prompts: list[list[dict]], tokens: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).eval()
    out = []
    for messages in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=tokens, do_sample=False)
        new = gen[0, ids.shape[1] :].tolist()
        out.append({"text": tok.decode(new, skip_special_tokens=True), "token_ids": new})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", action="append", default=[], help="NAME=URL of a server")
    p.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/tiergate/models" / MODEL)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    items = load_golden()
    runs: dict[str, list[dict]] = {}
    for dtype in ("float32", "bfloat16"):
        runs[f"hf-{dtype}"] = hf_answers(
            a.model_dir, dtype, [i.messages() for i in items], a.tokens
        )
    for spec in a.engine:
        name, url = spec.split("=", 1)
        runs[name] = asyncio.run(answers(url, MODEL, items, a.tokens, 8, None, 300, True))
    truth = runs["hf-float32"]
    rows = {}
    for name, got in runs.items():
        agree = agreement(
            [(t["token_ids"], g["token_ids"]) for t, g in zip(truth, got, strict=True)]
        )
        rows[name] = {
            "gate_score": golden_report(items, got, 0.8)["score"],
            "identical": agree.exact_match,
            "first_token": agree.first_token_match,
            "mean_prefix": agree.mean_matching_prefix,
        }
    print(f"host: {platform.processor() or platform.machine()}, {a.tokens} tokens, vs hf-float32")
    print("| answers from | golden score | identical to hf-fp32 | first token | mean prefix |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['gate_score']:.0%} | {r['identical']:.0%} | {r['first_token']:.0%} "
            f"| {r['mean_prefix']:.1f} |"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"rows": rows, "answers": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
