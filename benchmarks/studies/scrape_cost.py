"""What the gateway's load scrape costs a running vLLM: its API server's CPU per scrape of
the whole /metrics text against the filtered one the gateway asks for
(serving/router/load.py), and, with --itl, the C=1 inter-token gaps while a scraper
asks once a second in either way.

    python -m benchmarks.studies.scrape_cost --engine-url http://127.0.0.1:PORT \\
        --engine-pid API_SERVER_PID --itl-model smollm2-135m-instruct \\
        --out benchmarks/out/scrape_cost.json

Blocks alternate (full, filtered, filtered, full, ...) so drift hits both alike. The
CPU is every thread's run time from /proc/PID/task/*/schedstat over a block; anything
else that scrapes the engine meanwhile (a gateway) adds the same to both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

from benchmarks.studies.gateway_capacity import percentile, run_meta
from benchmarks.studies.idle_cpu import cpu_ns
from serving.router.load import FILTERED_PATH, FULL_PATH

PATHS = {"full": FULL_PATH, "filtered": FILTERED_PATH}


def _order(block: int) -> list[str]:
    return ["full", "filtered"] if block % 2 == 0 else ["filtered", "full"]


def api_server_cpu(url: str, pid: int, blocks: int, scrapes: int) -> dict[str, list[float]]:
    """Milliseconds of the API server's CPU per scrape, per block and side."""
    out: dict[str, list[float]] = {side: [] for side in PATHS}
    with httpx.Client(timeout=30) as client:
        for block in range(blocks):
            for side in _order(block):
                before, size = cpu_ns(pid), 0
                for _ in range(scrapes):
                    size = len(client.get(url + PATHS[side]).content)
                    time.sleep(0.02)
                out[side].append((cpu_ns(pid) - before) / scrapes / 1e6)
                print(f"{side}: {out[side][-1]:.2f} ms per scrape ({size} bytes)", flush=True)
    return out


def itl_under_scrapes(url: str, model: str, blocks: int, seconds: float) -> list[dict]:
    """C=1 streams straight to the engine, 64 tokens each, while a thread scrapes once a
    second; each block scrapes one way. Returns the gaps' quantiles per block."""
    path, stop = [FULL_PATH], threading.Event()

    def scraper() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.wait(1.0):
                client.get(url + path[0])

    thread = threading.Thread(target=scraper, daemon=True)
    thread.start()
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 64}
    body |= {"ignore_eos": True, "stream": True}
    rows = []
    try:
        with httpx.Client(timeout=60) as client:
            for block in range(blocks):
                side = _order(block // 2)[block % 2]
                path[0] = PATHS[side]
                gaps: list[float] = []
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    last = None
                    with client.stream("POST", url + "/v1/completions", json=body) as r:
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                now = time.perf_counter()
                                if last is not None:
                                    gaps.append((now - last) * 1000)
                                last = now
                row = {"block": block, "scrape": side, "gaps": len(gaps)}
                row |= {f"p{q}": round(percentile(gaps, q / 100), 2) for q in (50, 99, 99.9)}
                row["max"] = round(max(gaps), 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        stop.set()
        thread.join(5)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-url", required=True, help="a running vLLM server")
    p.add_argument("--engine-pid", type=int, required=True, help="its API server's pid")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--scrapes", type=int, default=100, help="per block")
    p.add_argument("--itl-model", help="also the C=1 gaps under each way of scraping")
    p.add_argument("--itl-blocks", type=int, default=8)
    p.add_argument("--itl-seconds", type=float, default=45.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    cpu = api_server_cpu(a.engine_url, a.engine_pid, a.blocks, a.scrapes)
    result: dict = {"api_server_ms_per_scrape": cpu}
    for side, values in cpu.items():
        print(f"{side}: median {statistics.median(values):.2f} ms of the API server per scrape")
    if a.itl_model:
        rows = itl_under_scrapes(a.engine_url, a.itl_model, a.itl_blocks, a.itl_seconds)
        result["itl_c1"] = rows
        for side in PATHS:
            mine = [r for r in rows if r["scrape"] == side]
            p99 = statistics.median(r["p99"] for r in mine)
            p50 = statistics.median(r["p50"] for r in mine)
            print(f"{side}: C=1 gaps, median of blocks p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(run_meta("scrape_cost", argv) | result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
