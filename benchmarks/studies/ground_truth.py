"""Ground truth for the benchmark tools: `tiergate bench` and `vllm bench serve` against
a FAKE engine whose timing is known (benchmarks/studies/timed_engine.py), each figure
next to the value it must report.

    python -m benchmarks.studies.ground_truth \\
        --tokenizer ~/.cache/tiergate/models/smollm2-135m-instruct

Scenarios: C clients at or under the engine's batch (TTFT = ttft), and 2x the batch
(each request after the first cohort waits one whole request time S for a slot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.launch import REPO, exit_on_sigterm, free_port
from benchmarks.studies.agreement import KEYS, ours_cmd, ours_result, vllm_cmd, vllm_result


def truth(ttft: float, itl: float, n: int, c: int, batch: int) -> dict[str, float]:
    """What a perfect tool reports (ms, tok/s) for C closed-loop clients."""
    s = ttft + (n - 1) * itl
    queued = c > batch
    return {
        "ttft_ms": (s + ttft if queued else ttft) * 1e3,  # p50: most requests waited S
        "itl_ms": itl * 1e3,
        "tpot_ms": itl * 1e3,
        "output_tok_s": min(c, batch) * n / s,
    }


@contextlib.contextmanager
def timed_engine(port: int, a: argparse.Namespace):
    cmd = [sys.executable, "-m", "benchmarks.studies.timed_engine", "--port", str(port)]
    cmd += ["--ttft-ms", str(a.ttft_ms), "--itl-ms", str(a.itl_ms), "--batch", str(a.batch)]
    cmd += ["--jitter-ms", str(a.jitter_ms)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    try:
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--ttft-ms", type=float, default=250.0)
    p.add_argument("--itl-ms", type=float, default=40.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, nargs="+", default=[4, 16])
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="tiergate-truth-"))
    rows = []
    with timed_engine(free_port(), a) as url:
        for c in a.concurrency:
            known = truth(a.ttft_ms / 1e3, a.itl_ms / 1e3, a.output_len, c, a.batch)
            ns = argparse.Namespace(
                base_url=url,
                model="timed",
                tokenizer=a.tokenizer,
                input_len=a.input_len,
                output_len=a.output_len,
                num_prompts=c * a.requests_per_client,
                concurrency=c,
                seed=0,
            )
            measured = {}
            for tool in ("vllm", "tiergate"):
                out = work / f"{tool}-{c}"
                out.mkdir()
                cmd = vllm_cmd(ns, out) if tool == "vllm" else ours_cmd(ns, out, 0)
                done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{tool} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
                measured[tool] = vllm_result(out) if tool == "vllm" else ours_result(out)
            for k in KEYS:
                row = {"concurrency": c, "metric": k, "known": known[k]}
                for tool, m in measured.items():
                    row[tool] = m[k]
                    row[f"{tool}_error"] = m[k] / known[k] - 1
                rows.append(row)
                print(
                    f"C={c} {k}: known {known[k]:.2f}, vllm {row['vllm']:.2f} "
                    f"({row['vllm_error']:+.2%}), tiergate {row['tiergate']:.2f} "
                    f"({row['tiergate_error']:+.2%})",
                    flush=True,
                )
    worst = {t: max(abs(r[f"{t}_error"]) for r in rows) for t in ("vllm", "tiergate")}
    print("| C | metric | known | vllm bench serve | error | tiergate bench | error |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r['metric']} | {r['known']:.2f} | {r['vllm']:.2f} | "
            f"{r['vllm_error']:+.2%} | {r['tiergate']:.2f} | {r['tiergate_error']:+.2%} |"
        )
    print(f"worst |error|: vllm {worst['vllm']:.2%}, tiergate {worst['tiergate']:.2%}")
    print(
        "median |error|:",
        {
            t: f"{statistics.median(abs(r[f'{t}_error']) for r in rows):.2%}"
            for t in ("vllm", "tiergate")
        },
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
