"""The bench client's own ceiling: an open-loop rate sweep against the zero-latency FAKE
server (benchmarks/studies/fake_server.py), to find the rate past which the client, not the
server, is the bottleneck, and to show that the verdict says so there.

    python -m benchmarks.studies.client_ceiling --rates 500 1000 1500 2000 2500 3000 \\
        --out benchmarks/out/ceiling

The fake server runs pinned to the last CPU and the client to the others (when there
are two or more), so they do not share a core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from benchmarks.launch import exit_on_sigterm, free_port


def start_fake(port: int) -> subprocess.Popen:
    cpus = sorted(os.sched_getaffinity(0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.studies.fake_server", "--port", str(port)],
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpus[-1]})) if len(cpus) > 1 else None,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the fake server did not start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=float, nargs="+", default=[500, 1000, 1500, 2000, 2500, 3000])
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--output-len", default="8")
    p.add_argument("--tokenizer", required=True, help="any local tokenizer folder")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/ceiling"))
    a = p.parse_args(argv)
    exit_on_sigterm()
    port = free_port()
    fake = start_fake(port)
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, set(cpus[:-1]))
        from benchmarks import bench

        args = bench.build_parser().parse_args(
            [
                "--base-url",
                f"http://127.0.0.1:{port}",
                "--model",
                "fake",
                "--tokenizer",
                a.tokenizer,
                "--rate",
                *map(str, a.rates),
                "--duration",
                str(a.duration),
                "--input-len",
                "16",
                "--output-len",
                a.output_len,
                "--out",
                str(a.out),
            ]
        )
        bench.main(args)
    finally:
        fake.terminate()
        fake.wait(10)
    doc = json.loads((a.out / "bench.json").read_text())
    print("| offered req/s | achieved req/s | send lag p99 ms | client CPU | client flagged |")
    print("|---|---|---|---|---|")
    for pt in doc["points"]:
        flagged = any("client saturated" in r for r in pt["verdict"]["reasons"])
        print(
            f"| {pt['load']['value']:g} | {pt['summary']['req_s']:.0f} | "
            f"{pt['summary']['send_lag_ms']['p99']:.1f} | "
            f"{pt['facts']['client_cpu_share']:.0%} | {'yes' if flagged else 'no'} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
