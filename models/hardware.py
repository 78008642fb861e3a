"""Accelerator profiles, model shapes and quantization formats, as typed data.

Loaded from configs/gpus.yaml and configs/model_specs.yaml. Pure data plus the
arithmetic that follows from it (parameter counts, bytes per weight); used by the
memory planner and by the benchmarks' roofline model.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
GIB = 1024**3


class GPUProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = ""
    name: str
    memory_gib: float = Field(gt=0)
    bandwidth_gbs: float = Field(gt=0)
    bf16_tflops: float = Field(gt=0)
    fp32_tflops: float | None = None
    fp8_tflops: float | None = None
    int8_tops: float | None = None
    interconnect_gbs: float = 64
    arch: str

    def peak_tflops(self, compute_dtype: str) -> float:
        """Peak dense throughput for the dtype the matmuls run in."""
        value = {
            "bf16": self.bf16_tflops,
            "fp16": self.bf16_tflops,
            "fp32": self.fp32_tflops,
            "fp8": self.fp8_tflops,
            "int8": self.int8_tops,
        }.get(compute_dtype)
        return value or self.bf16_tflops  # no native unit: runs upcast, at the bf16 rate


class Quant(BaseModel):
    """How a quantization format stores linear-layer weights and which units run them."""

    model_config = ConfigDict(frozen=True)

    bytes_per_weight: float
    compute: str  # the dtype the matmuls run in (W4A16 formats dequantize to bf16)
    needs: tuple[str, ...] = ()  # GPU archs that support it natively; () = all


_GROUP = 2.5 / 128  # fp16 scale + 4-bit zero per group of 128 weights
QUANTS: dict[str, Quant] = {
    "none": Quant(bytes_per_weight=2.0, compute="bf16"),
    "fp32": Quant(bytes_per_weight=4.0, compute="fp32"),
    "fp8": Quant(bytes_per_weight=1.0, compute="fp8", needs=("ada", "hopper")),
    "int8": Quant(bytes_per_weight=1.0, compute="int8"),  # W8A8, e.g. compressed-tensors
    "compressed-tensors": Quant(bytes_per_weight=1.0, compute="int8"),
    "awq": Quant(bytes_per_weight=0.5 + _GROUP, compute="bf16"),
    "awq_marlin": Quant(bytes_per_weight=0.5 + _GROUP, compute="bf16"),
    "gptq": Quant(bytes_per_weight=0.5 + _GROUP, compute="bf16"),
    "gptq_marlin": Quant(bytes_per_weight=0.5 + _GROUP, compute="bf16"),
    "bitsandbytes": Quant(bytes_per_weight=0.5 + 4 / 64, compute="bf16"),  # NF4, absmax/64
}
KV_BYTES = {"auto": 2, "bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1}


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str = ""
    hf_id: str = ""
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    intermediate: int = Field(gt=0)
    vocab: int = Field(gt=0)
    tied_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def from_config_json(cls, path: Path, key: str = "") -> ModelSpec:
        """From a Hugging Face config.json (a llama-style decoder)."""
        c = json.loads(Path(path).read_text())
        heads = c["num_attention_heads"]
        return cls(
            key=key or Path(path).parent.name,
            layers=c["num_hidden_layers"],
            hidden=c["hidden_size"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            intermediate=c["intermediate_size"],
            vocab=c["vocab_size"],
            tied_embeddings=c.get("tie_word_embeddings", False),
            qkv_bias=c.get("attention_bias", False) or c.get("model_type") == "qwen2",
        )

    @cached_property
    def linear_params(self) -> int:
        """Weights in the transformer blocks' matmuls (what quantization shrinks)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (q + kv + o + mlp)

    @cached_property
    def other_params(self) -> int:
        """Embeddings, LM head, norms and biases: kept in 16 bits by the formats above."""
        embed = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        norms = (2 * self.layers + 1) * self.hidden
        bias = (
            self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        )
        return embed + norms + bias

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params

    def weight_bytes(self, quant: str = "none", dtype_bytes: float = 2.0) -> float:
        """Bytes of weights. `dtype_bytes` is the unquantized dtype (2 for bf16, 4 for fp32)."""
        q = QUANTS[quant]
        linear = dtype_bytes if quant == "none" else q.bytes_per_weight
        return self.linear_params * linear + self.other_params * dtype_bytes

    def kv_bytes_per_token(self, kv_dtype_bytes: float, tp: int = 1, pp: int = 1) -> float:
        """K and V for one token, on one GPU of a TP x PP group (KV heads are split by TP,
        and replicated when TP exceeds their number)."""
        heads = max(1, self.kv_heads // tp)
        return 2 * (self.layers / pp) * heads * self.head_dim * kv_dtype_bytes

    def decode_flops_per_token(self) -> float:
        return 2.0 * (self.linear_params + self.vocab * self.hidden)


def _load(path: Path, section: str) -> dict:
    return (yaml.safe_load(path.read_text()) or {}).get(section) or {}


def gpu_profiles(path: Path = CONFIGS / "gpus.yaml") -> dict[str, GPUProfile]:
    return {k: GPUProfile(key=k, **v) for k, v in _load(path, "gpus").items()}


def model_specs(path: Path = CONFIGS / "model_specs.yaml") -> dict[str, ModelSpec]:
    return {k: ModelSpec(key=k, **v) for k, v in _load(path, "models").items()}


def lookup(table: dict, key: str, what: str):
    """table[key], or a ValueError that lists what is known."""
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; known: {', '.join(sorted(table))}") from None
