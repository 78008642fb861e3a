"""INT8 W8A8 (compressed-tensors, "int-quantized") from a prepared safetensors folder.

Round-to-nearest, symmetric int8 weights per output channel; activations int8 per token,
dynamic (vLLM quantizes them at run time), so no calibration data is needed. This is the
same scheme llm-compressor's `QuantizationModifier(scheme="W8A8")` writes, done here with
torch and safetensors alone so that `tiergate models prepare smollm2-135m-instruct-w8a8`
works on a fresh machine (llm-compressor pins other transformers versions).
Embeddings, norms and `lm_head` stay in full precision.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

# The Linear layers of a Llama-style decoder; vLLM fuses q/k/v and gate/up itself.
LINEAR = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")

QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "int-quantized",
    "quantization_status": "compressed",
    "ignore": ["lm_head"],
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "channel",
                "dynamic": False,
            },
            "input_activations": {
                "num_bits": 8,
                "type": "int",
                "symmetric": True,
                "strategy": "token",
                "dynamic": True,
            },
        }
    },
}


def quantize_weight(weight):  # torch.Tensor -> (int8 weight, float32 scale [out, 1])
    import torch

    w = weight.to(torch.float32)
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_folder(src: Path, out: Path) -> int:
    """Write the W8A8 checkpoint of `src` into `out`; returns how many layers were quantized."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors: dict = {}
    for shard in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(shard))
    if not tensors:
        raise ValueError(f"{src}: no safetensors weights")
    quantized, done = {}, 0
    for name, tensor in tensors.items():
        if LINEAR.search(name) and tensor.ndim == 2:
            q, scale = quantize_weight(tensor)
            quantized[name] = q
            quantized[name.removesuffix(".weight") + ".weight_scale"] = scale
            done += 1
        else:
            quantized[name] = tensor.contiguous()
    if not done:
        raise ValueError(f"{src}: no Linear layers matched {LINEAR.pattern}")
    save_file(quantized, out / "model.safetensors", metadata={"format": "pt"})
    for item in src.iterdir():
        if item.suffix == ".safetensors" or item.name.endswith(".safetensors.index.json"):
            continue
        if item.is_file() and item.name != "tiergate-prepared.json":
            shutil.copy2(item, out / item.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIG
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return done
