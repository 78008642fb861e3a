"""Refuse, at start, an engine config whose model cannot fit, and say by how much.

Uses the memory planner (models/memory.py) with the engine's own vLLM args. Engines
with `plan: {gpu: ...}` are checked against that GPU profile; supervised CPU engines
against their VLLM_CPU_KVCACHE_SPACE. Anything the planner cannot judge is skipped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from models.hardware import QUANTS, GPUProfile, ModelSpec, gpu_profiles, lookup, model_specs
from models.manifest import ModelError, load_manifest
from models.memory import EngineShape, plan_memory
from serving.config import EngineSettings, Settings
from serving.engines.cpu import engine_choice

_DTYPES = {
    "float32": "fp32",
    "float": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
}


def _weights_quantization(engine: EngineSettings) -> str:
    """What the checkpoint itself is quantized with (vLLM reads it from the weights)."""
    try:
        quant = load_manifest(engine.model).quantization.lower()
    except ModelError:
        return "none"
    return quant if quant in QUANTS else "none"


def shape_of(engine: EngineSettings, spec_max_len: int | None) -> EngineShape | None:
    a = {k.replace("-", "_"): v for k, v in engine.args.items()}
    max_len = a.get("max_model_len") or spec_max_len
    quant = (
        a.get("quantization")
        or (engine.plan and engine.plan.weights_quantization)
        or _weights_quantization(engine)
    )
    if max_len is None or quant not in QUANTS:
        return None
    space = engine.env.get("VLLM_CPU_KVCACHE_SPACE")
    return EngineShape(
        max_model_len=int(max_len),
        max_num_seqs=int(a.get("max_num_seqs") or 256),
        max_num_batched_tokens=a.get("max_num_batched_tokens"),
        gpu_memory_utilization=float(a.get("gpu_memory_utilization") or 0.9),
        kv_cache_dtype=a.get("kv_cache_dtype") or "auto",
        block_size=a.get("block_size"),
        tensor_parallel_size=int(a.get("tensor_parallel_size") or 1),
        pipeline_parallel_size=int(a.get("pipeline_parallel_size") or 1),
        quantization=quant,
        dtype=_DTYPES.get(str(a.get("dtype") or "bfloat16"), "bf16"),
        cpu_kvcache_space_gib=float(space) if space else None,
    )


def _cpu_device() -> GPUProfile:
    try:
        kib = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
    except (OSError, StopIteration):
        kib = 16 * 1024**2
    return GPUProfile(
        key="cpu",
        name="this CPU",
        memory_gib=kib / 1024**2,
        bandwidth_gbs=30,
        bf16_tflops=0.1,
        arch="cpu",
    )


def check_settings(
    settings: Settings,
    model_dirs: dict[str, Path] | None = None,
    cpu_build: bool = False,
    verbose: Callable[[str], None] | None = None,
) -> list[str]:
    """Problems (each naming its engine's key); [] when every judged engine fits."""
    model_dirs = model_dirs or {}
    problems = []
    for i, engine in enumerate(settings.engines):
        where = f"engines.{i}"
        folder = model_dirs.get(engine.name)
        if engine.plan is not None:
            device = lookup(gpu_profiles(), engine.plan.gpu, "GPU")
            if engine.plan.model_spec:
                spec = lookup(model_specs(), engine.plan.model_spec, "model spec")
            elif folder and (folder / "config.json").is_file():
                spec = ModelSpec.from_config_json(folder / "config.json", engine.model)
            else:
                problems.append(f"{where}.plan.model_spec: needed (no local config.json)")
                continue
        elif cpu_build and folder and engine.supervised and (folder / "config.json").is_file():
            if "VLLM_CPU_KVCACHE_SPACE" not in engine.env:
                continue  # vLLM sizes it itself
            device, spec = _cpu_device(), ModelSpec.from_config_json(folder / "config.json")
        else:
            continue
        shape = shape_of(engine, None)
        if shape is None:
            continue
        if device.arch == "cpu" and "dtype" not in engine.args:
            choice = engine_choice(engine.model, engine.args, engine.host_variant)
            assert choice is not None  # dtype is unset
            shape = replace(shape, dtype=_DTYPES[choice.dtype])
        plan = plan_memory(spec, device, shape)
        if verbose:
            verbose(f"{where} ({engine.name}): {plan.explain()}")
        if not plan.fits:
            key = "env.VLLM_CPU_KVCACHE_SPACE" if device.arch == "cpu" else "args.max_model_len"
            problems.append(f"{where}.{key}: {plan.explain()}")
    return problems
