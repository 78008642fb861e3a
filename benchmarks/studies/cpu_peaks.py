"""This host's peaks for the roofline: memory bandwidth and GEMM rates on N threads.

configs/gpus.yaml's CPU profiles come from here, so that `plan calibrate` fits
efficiency factors below 1 rather than hitting the grid's edge on a faster CPU.

    python -m benchmarks.studies.cpu_peaks --threads 2 --out benchmarks/out/cpu_peaks_amx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_flags() -> list[str]:
    words = set(Path("/proc/cpuinfo").read_text().split())
    return [f for f in FLAGS if f in words]


def _timed(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(size: int = 2048) -> dict:
    import torch

    n = 256 * 1024**2  # 1 GiB of fp32, far past the caches
    a, b = torch.ones(n), torch.empty(n)
    out = {
        "copy_gbs": 2 * 4 * n / _timed(lambda: b.copy_(a)) / 1e9,
        "read_gbs": 4 * n / _timed(lambda: a.sum()) / 1e9,
    }
    flops = 2 * size**3
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x, y = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        out[f"{name}_tflops"] = flops / _timed(lambda x=x, y=y: x @ y) / 1e12
    xi = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    yi = torch.randint(-128, 127, (size, size), dtype=torch.int8)
    try:
        out["int8_tops"] = flops / _timed(lambda: torch._int_mm(xi, yi)) / 1e12
    except RuntimeError:  # no int8 GEMM on this build
        out["int8_tops"] = None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    doc = {"threads": a.threads, "flags": cpu_flags(), "torch": torch.__version__, **measure()}
    print(json.dumps(doc, indent=1))
    if a.out:
        a.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
