"""Memory planner: will a model fit an accelerator under an engine config, and how many
sequences can run at once? Pure arithmetic that follows vLLM's own accounting:

  KV budget per GPU = memory x gpu_memory_utilization - weights - peak activations
                      - non-torch overhead (CUDA graphs, NCCL, cuBLAS workspaces)
  KV tokens         = budget / KV bytes per token, rounded down to whole blocks

On the CPU, vLLM takes the KV budget as given (VLLM_CPU_KVCACHE_SPACE) and uses
blocks of 128 tokens. The activation and overhead terms are estimates; vLLM measures
them by profiling at start-up, so treat GPU figures as +/- 1-2 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.hardware import GIB, KV_BYTES, QUANTS, GPUProfile, ModelSpec

CPU_BLOCK = 128


@dataclass(frozen=True)
class EngineShape:
    """The engine arguments that decide memory, in vLLM's own names."""

    max_model_len: int
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 8192, vLLM V1's default with chunked prefill
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
    block_size: int | None = None  # None: 16 on GPU, 128 on CPU
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    quantization: str = "none"
    dtype: str = "bf16"  # of the unquantized parts (and of the KV cache when "auto")
    cpu_kvcache_space_gib: float | None = None  # VLLM_CPU_KVCACHE_SPACE
    overhead_gib: float = 1.0  # GPU only

    @property
    def gpus(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class MemoryPlan:
    model: str
    device: str
    weight_bytes: float  # whole model
    weight_bytes_per_gpu: float
    activation_bytes: float
    overhead_bytes: float
    kv_budget_bytes: float  # per GPU
    kv_bytes_per_token: float  # per GPU
    block_size: int
    kv_tokens: int
    max_model_len: int

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.max_model_len

    @property
    def max_concurrency(self) -> float:
        """Sequences of max_model_len tokens that fit at once (vLLM logs this figure)."""
        return self.kv_tokens / self.max_model_len

    def sequences_at(self, context: int) -> int:
        """Sequences of `context` tokens that fit at once."""
        blocks = self.kv_tokens // self.block_size
        return blocks // -(-context // self.block_size)

    @property
    def shortfall_bytes(self) -> float:
        """How much more memory (per GPU) one max_model_len sequence needs; 0 if it fits."""
        need = self.max_model_len * self.kv_bytes_per_token
        return max(0.0, need - self.kv_budget_bytes)

    def explain(self) -> str:
        g = GIB
        head = (
            f"{self.model} on {self.device}: weights {self.weight_bytes_per_gpu / g:.2f} GiB"
            f" per device, activations ~{self.activation_bytes / g:.2f} GiB, overhead "
            f"{self.overhead_bytes / g:.2f} GiB -> KV cache {self.kv_budget_bytes / g:.2f} GiB"
            f" = {self.kv_tokens:,} tokens ({self.kv_bytes_per_token / 1024:.1f} KiB/token)"
        )
        if self.fits:
            return head + f", {self.max_concurrency:.2f}x concurrency at {self.max_model_len:,}"
        return (
            head + f"; does NOT fit: one {self.max_model_len:,}-token sequence needs "
            f"{self.max_model_len * self.kv_bytes_per_token / g:.2f} GiB of KV cache, short by "
            f"{self.shortfall_bytes / g:.2f} GiB per device"
        )


def plan_memory(spec: ModelSpec, device: GPUProfile, shape: EngineShape) -> MemoryPlan:
    if shape.quantization not in QUANTS:
        raise ValueError(f"unknown quantization {shape.quantization!r}; known: {sorted(QUANTS)}")
    dtype_bytes = 4 if shape.dtype in ("fp32", "float32") else 2
    kv_bytes = dtype_bytes if shape.kv_cache_dtype == "auto" else KV_BYTES[shape.kv_cache_dtype]
    tp, pp = shape.tensor_parallel_size, shape.pipeline_parallel_size
    weights = spec.weight_bytes(shape.quantization, dtype_bytes)
    per_gpu = weights / shape.gpus
    kv_per_token = spec.kv_bytes_per_token(kv_bytes, tp, pp)
    cpu = device.arch == "cpu"
    if cpu:
        block = shape.block_size or CPU_BLOCK
        activations = overhead = 0.0
        budget = (shape.cpu_kvcache_space_gib or 4.0) * GIB
    else:
        block = shape.block_size or 16
        batched = shape.max_num_batched_tokens or 8192
        # hidden states + MLP intermediates of one batched forward pass, plus fp32 logits
        activations = batched * (4 * spec.hidden + 2 * spec.intermediate / tp) * dtype_bytes
        activations += min(shape.max_num_seqs, batched) * spec.vocab * 4 / tp
        overhead = shape.overhead_gib * GIB
        budget = device.memory_gib * GIB * shape.gpu_memory_utilization
        budget -= per_gpu + activations + overhead
    tokens = int(max(budget, 0) // kv_per_token) // block * block
    return MemoryPlan(
        model=spec.key,
        device=f"{shape.gpus} x {device.key or device.name}",
        weight_bytes=weights,
        weight_bytes_per_gpu=per_gpu,
        activation_bytes=activations,
        overhead_bytes=overhead,
        kv_budget_bytes=budget,
        kv_bytes_per_token=kv_per_token,
        block_size=block,
        kv_tokens=tokens,
        max_model_len=shape.max_model_len,
    )
