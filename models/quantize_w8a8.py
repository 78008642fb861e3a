"""Make an INT8 W8A8 (compressed-tensors) checkpoint of a prepared model with
llm-compressor: int8 weights per output channel, int8 activations per token, both
symmetric and dynamic (no calibration data needed), lm_head left in full precision.

llm-compressor pins transformers/compressed-tensors versions that differ from the
serving lock, so run it from its own virtualenv:

    python3 -m venv .venv-quant && .venv-quant/bin/pip install llmcompressor torch==2.13.0+cpu
    .venv-quant/bin/python models/quantize_w8a8.py \\
        --src ~/.cache/tiergate/models/smollm2-135m-instruct \\
        --out ~/.cache/tiergate/models/smollm2-135m-instruct-w8a8
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = a.src.expanduser(), a.out.expanduser()
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(src)
    recipe = QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])
    oneshot(model=model, recipe=recipe)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, save_compressed=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
