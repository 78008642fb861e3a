"""Predict serving throughput on an accelerator from first principles, and calibrate.

Prefill is compute-bound: 2 x params FLOPs per prompt token at the peak matmul rate.
Decode is bandwidth-bound at small batches (every step reads all weights plus the
batch's KV cache) and compute-bound at large ones. Each step also pays a fixed
scheduling overhead. Three efficiency factors scale the peaks to what an engine
achieves; `calibrate` fits them to measured runs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from models.hardware import KV_BYTES, QUANTS, GPUProfile, ModelSpec
from models.memory import EngineShape, plan_memory


@dataclass(frozen=True)
class Efficiency:
    bandwidth: float = 0.75  # achieved / peak memory bandwidth in decode
    compute: float = 0.55  # achieved / peak matmul throughput
    step_overhead_s: float = 0.004  # per engine step: scheduler, sampling, launches


@dataclass(frozen=True)
class Workload:
    input_tokens: float
    output_tokens: float
    concurrency: int


@dataclass(frozen=True)
class Prediction:
    concurrency: int  # after the KV cache's limit
    step_s: float
    prefill_s: float  # one request's prompt
    output_tok_s: float
    req_s: float
    ttft_s: float
    tpot_s: float
    bound: str  # "bandwidth" or "compute" (of the decode step)


class Roofline:
    def __init__(
        self,
        spec: ModelSpec,
        device: GPUProfile,
        quant: str = "none",
        *,
        tp: int = 1,
        kv_cache_dtype: str = "auto",
        dtype_bytes: float = 2.0,
        eff: Efficiency = Efficiency(),
    ) -> None:
        self.spec, self.device, self.quant, self.tp, self.eff = spec, device, quant, tp, eff
        self.dtype_bytes = dtype_bytes
        self.kv_bytes = dtype_bytes if kv_cache_dtype == "auto" else KV_BYTES[kv_cache_dtype]
        compute = "fp32" if dtype_bytes == 4 and quant == "none" else QUANTS[quant].compute
        self.peak_flops = device.peak_tflops(compute) * 1e12 * tp
        self.bandwidth = device.bandwidth_gbs * 1e9 * tp
        self.weights = spec.weight_bytes(quant, dtype_bytes)

    def with_efficiency(self, eff: Efficiency) -> Roofline:
        clone = object.__new__(Roofline)
        clone.__dict__ = self.__dict__ | {"eff": eff}
        return clone

    def _comm_s(self, tokens: float) -> float:
        """Two all-reduces of the hidden state per layer under tensor parallelism."""
        if self.tp == 1:
            return 0.0
        size = tokens * self.spec.hidden * 2 * 2 * (self.tp - 1) / self.tp
        link = self.device.interconnect_gbs * 1e9
        return 2 * self.spec.layers * (10e-6 + size / link)

    def kv_bytes_per_token(self) -> float:
        return 2 * self.spec.layers * self.spec.kv_heads * self.spec.head_dim * self.kv_bytes

    def step(self, tokens: float, kv_tokens: float, attention_tokens: float = 0.0) -> float:
        """One engine step over `tokens` new tokens (decodes and prefill chunks) that
        read `kv_tokens` of cached K/V. `attention_tokens`: the sum over new tokens of
        the context each attends to (its attention FLOPs)."""
        return self._step(tokens, kv_tokens, attention_tokens)[0]

    def _step(self, tokens: float, kv_tokens: float, attention_tokens: float) -> tuple[float, str]:
        mem = (self.weights + kv_tokens * self.kv_bytes_per_token()) / (
            self.bandwidth * self.eff.bandwidth
        )
        flops = self.spec.decode_flops_per_token() * tokens
        flops += 4 * self.spec.layers * self.spec.heads * self.spec.head_dim * attention_tokens
        comp = flops / (self.peak_flops * self.eff.compute)
        step = max(mem, comp) + self.eff.step_overhead_s + self._comm_s(tokens)
        return step, "bandwidth" if mem >= comp else "compute"

    def decode_step(self, batch: int, context: float) -> tuple[float, str]:
        return self._step(batch, batch * context, 0.0)

    def prefill(self, tokens: float) -> float:
        flops = self.spec.decode_flops_per_token() * tokens
        flops += 2 * self.spec.layers * tokens * tokens * self.spec.heads * self.spec.head_dim
        comp = flops / (self.peak_flops * self.eff.compute)
        return max(comp, self.weights / (self.bandwidth * self.eff.bandwidth)) + self._comm_s(
            tokens
        )

    def predict(self, w: Workload, max_concurrency: int | None = None) -> Prediction:
        """Closed loop at `w.concurrency`: in one cycle each of the B running requests
        is prefilled once and all B decode `output_tokens` steps together."""
        b = max(1, min(w.concurrency, max_concurrency or w.concurrency))
        step, bound = self.decode_step(b, w.input_tokens + w.output_tokens / 2)
        pre = self.prefill(w.input_tokens)
        cycle = w.output_tokens * step + b * pre
        return Prediction(
            concurrency=b,
            step_s=step,
            prefill_s=pre,
            output_tok_s=b * w.output_tokens / cycle,
            req_s=b / cycle,
            ttft_s=pre + step,
            tpot_s=cycle / w.output_tokens,
            bound=bound,
        )

    def max_concurrency(self, shape: EngineShape, context: int) -> int:
        """How many sequences of `context` tokens the KV cache holds (memory planner)."""
        plan = plan_memory(self.spec, self.device, shape)
        return max(plan.sequences_at(context), 0)


@dataclass(frozen=True)
class Observation:
    workload: Workload
    output_tok_s: float


def calibrate(model: Roofline, observations: list[Observation]) -> tuple[Efficiency, float]:
    """Fit the efficiency factors to measured throughput by grid search on the squared
    log error. Returns the fit and its RMS relative error."""
    if not observations:
        raise ValueError("calibration needs at least one measured point")
    grid = [round(0.04 * i, 2) for i in range(1, 26)]
    overheads = [0.0, *(0.0005 * 1.3**i for i in range(31))]  # 0.5 ms .. 1.3 s

    def ratios(eff: Efficiency) -> Iterator[float]:
        m = model.with_efficiency(eff)
        return (m.predict(o.workload).output_tok_s / o.output_tok_s for o in observations)

    candidates = itertools.product(grid, grid, overheads)
    return _grid_search((Efficiency(*c) for c in candidates), ratios, len(observations))


def _grid_search(
    candidates: Iterable[Efficiency], ratios: Callable[[Efficiency], Iterable[float]], n: int
) -> tuple[Efficiency, float]:
    """The candidate whose predicted/measured ratios have the least squared log error,
    and its RMS relative error over the `n` points."""
    best, best_err = Efficiency(), math.inf
    for eff in candidates:
        err = sum(math.log(r) ** 2 for r in ratios(eff))
        if err < best_err:
            best, best_err = eff, err
    return best, math.expm1(math.sqrt(best_err / n))


@dataclass(frozen=True)
class StepTiming:
    model: Roofline
    batch: int
    context: float  # tokens of K/V each sequence reads per step (the run's mean; 0: none)
    step_s: float  # measured seconds per decode step


def fit_steps(timings: list[StepTiming], compute: float) -> tuple[Efficiency, float]:
    """Fit the bandwidth share and per-step overhead to measured decode steps (one card,
    any models), with the compute share given (a measured GEMM rate / the datasheet's).
    Grid search on the squared log error; returns the fit and its RMS relative error."""
    if not timings:
        raise ValueError("a step fit needs at least one measured step")
    shares = [round(0.30 + 0.01 * i, 2) for i in range(71)]  # 0.30 .. 1.00
    overheads = [0.00002 * i for i in range(501)]  # 0 .. 10 ms, 20 µs apart

    def ratios(eff: Efficiency) -> Iterator[float]:
        return (
            t.model.with_efficiency(eff).decode_step(t.batch, t.context)[0] / t.step_s
            for t in timings
        )

    candidates = itertools.product(shares, overheads)
    return _grid_search(
        (Efficiency(bw, compute, ov) for bw, ov in candidates), ratios, len(timings)
    )


def relative_error(predicted: float, measured: float) -> float:
    return predicted / measured - 1.0
