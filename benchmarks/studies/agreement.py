"""`tiergate bench` against vLLM's own `vllm bench serve`: the same server, load and
dataset shape, run alternately (vLLM, ours, ours, vLLM, ...) in one sitting.

    python -m benchmarks.studies.agreement --base-url http://127.0.0.1:8000 \\
        --model smollm2-135m-instruct --tokenizer ~/.cache/tiergate/models/smollm2-135m-instruct

Compares median TTFT, median ITL, median TPOT and output throughput (medians over the
rounds) and prints our figure relative to vLLM's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.launch import REPO, exit_on_sigterm

KEYS = ("ttft_ms", "itl_ms", "tpot_ms", "output_tok_s")


def vllm_cmd(a: argparse.Namespace, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.studies.vllm_bench",
        "--backend",
        "openai",
        "--base-url",
        a.base_url,
        "--endpoint",
        "/v1/completions",
        "--model",
        a.model,
        "--tokenizer",
        a.tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(a.input_len),
        "--random-output-len",
        str(a.output_len),
        "--num-prompts",
        str(a.num_prompts),
        "--max-concurrency",
        str(a.concurrency),
        "--ignore-eos",
        # vLLM's bench no longer asks for greedy decoding by default: the server's default
        # (SmolLM2: sampled, top-p) is a slower sampler on the CPU. Same requests as ours.
        "--temperature",
        "0",
        "--seed",
        str(a.seed),
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        "vllm.json",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--save-detailed",
        "--disable-tqdm",
    ]


def vllm_result(out: Path) -> dict:
    d = json.loads((out / "vllm.json").read_text())
    return {
        "ttft_ms": d["median_ttft_ms"],
        "itl_ms": d["median_itl_ms"],
        "tpot_ms": d["median_tpot_ms"],
        "output_tok_s": d["output_throughput"],
        "completed": d["completed"],
        "mean_input_tokens": d["total_input_tokens"] / max(1, d["completed"]),
    }


def vllm_samples(out: Path) -> dict[str, list[float]]:
    """Per-request values (ms) from vLLM's detailed result, for medians over all rounds."""
    d = json.loads((out / "vllm.json").read_text())
    ok = [
        (t, lat, n, itl)
        for t, lat, n, itl in zip(
            d["ttfts"], d["latencies"], d["output_lens"], d["itls"], strict=True
        )
        if t and n
    ]
    return {
        "ttft_ms": [t * 1e3 for t, _, _, _ in ok],
        "itl_ms": [x * 1e3 for _, _, _, itl in ok for x in itl],
        "tpot_ms": [(lat - t) / (n - 1) * 1e3 for t, lat, n, _ in ok if n > 1],
    }


def ours_samples(out: Path) -> dict[str, list[float]]:
    point = json.loads((out / "bench.json").read_text())["points"][0]
    done = [r for r in point["requests"] if r["error_kind"] is None]
    itl = []
    for r in done:
        times = r["chunk_times"]
        itl += [(b - a) * 1e3 for a, b in itertools.pairwise(times)]
    return {
        "ttft_ms": [r["ttft_ms"] for r in done if r["ttft_ms"] is not None],
        "itl_ms": itl,
        "tpot_ms": [r["tpot_ms"] for r in done if r["tpot_ms"] is not None],
    }


def ours_cmd(a: argparse.Namespace, out: Path, seed: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "serving.cli",
        "bench",
        "--base-url",
        a.base_url,
        "--model",
        a.model,
        "--tokenizer",
        a.tokenizer,
        "--concurrency",
        str(a.concurrency),
        "--requests",
        str(a.num_prompts),
        "--input-len",
        str(a.input_len),
        "--output-len",
        str(a.output_len),
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def ours_result(out: Path) -> dict:
    s = json.loads((out / "bench.json").read_text())["points"][0]["summary"]
    return {
        "ttft_ms": s["ttft_ms"]["p50"],
        "itl_ms": s["itl_ms"]["p50"],
        "tpot_ms": s["tpot_ms"]["p50"],
        "output_tok_s": s["output_tok_s"],
        "completed": s["completed"],
        "mean_input_tokens": s["mean_input_tokens"],
    }


def _reap(proc: subprocess.Popen, tool: str) -> float:
    """Wait for a tool's run; returns the CPU-seconds it and its children used."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {tool} run failed")
    return usage.ru_utime + usage.ru_stime


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--together",
        action="store_true",
        help="run both tools at the same time (each at --concurrency) so that both measure "
        "the same server moments; otherwise alternate them",
    )
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    work = Path(tempfile.mkdtemp(prefix="tiergate-agreement-"))
    runs: dict[str, list[dict]] = {"vllm": [], "tiergate": []}
    pooled: dict[str, dict[str, list[float]]] = {t: {} for t in runs}
    for i in range(a.rounds):
        dirs = {t: work / f"{t}-{i}" for t in runs}
        for d in dirs.values():
            d.mkdir()
        cmds = {
            "vllm": vllm_cmd(a, dirs["vllm"]),
            "tiergate": ours_cmd(a, dirs["tiergate"], a.seed + i),
        }
        order = ("vllm", "tiergate") if i % 2 == 0 else ("tiergate", "vllm")
        cpu: dict[str, float] = {}
        if a.together:
            procs = {t: _start(cmds[t]) for t in order}
            for t, proc in procs.items():
                cpu[t] = _reap(proc, t)
        else:
            for t in order:
                cpu[t] = _reap(_start(cmds[t]), t)
        for tool in order:
            out = dirs[tool]
            result = vllm_result(out) if tool == "vllm" else ours_result(out)
            # the tool's own CPU (its process tree): on a small host it is taken from the engine
            result["client_cpu_s"] = cpu[tool]
            if not result["completed"]:
                raise SystemExit(f"round {i + 1}: no {tool} request completed; is the server up?")
            runs[tool].append(result)
            for k, v in (vllm_samples(out) if tool == "vllm" else ours_samples(out)).items():
                pooled[tool].setdefault(k, []).extend(v)
            print(
                f"round {i + 1} {tool}: "
                + ", ".join(
                    f"{k} {result[k]:.2f}" for k in (*KEYS, "mean_input_tokens", "client_cpu_s")
                ),
                flush=True,
            )
    med = {t: {k: statistics.median(r[k] for r in rs) for k in KEYS} for t, rs in runs.items()}
    # Latency: the median over every request of every round (a round's median of ~50
    # requests moves by several % with the batch each request happened to meet);
    # throughput: the median of the rounds' figures.
    pool = {
        t: {k: statistics.median(v) for k, v in pooled[t].items()}
        | {"output_tok_s": med[t]["output_tok_s"]}
        for t in runs
    }
    # Each round's two runs are neighbours in time (ABBA order): their ratio sees little
    # of the server's drift between rounds, and the median over rounds drops a round
    # that met a slow stretch.
    paired = {
        k: [o[k] / v[k] for v, o in zip(runs["vllm"], runs["tiergate"], strict=True)] for k in KEYS
    }
    print(
        "| metric | vllm bench serve | tiergate bench | tiergate / vllm "
        "| (median of round medians) | median of paired ratios |"
    )
    print("|---|---|---|---|---|---|")
    for k in KEYS:
        v, o = pool["vllm"][k], pool["tiergate"][k]
        print(
            f"| {k} | {v:.2f} | {o:.2f} | {o / v:.3f} | {med['tiergate'][k] / med['vllm'][k]:.3f} "
            f"| {statistics.median(paired[k]):.3f} |"
        )
    print(
        "paired ratios per round: "
        + "; ".join(f"{k} " + " ".join(f"{r:.3f}" for r in paired[k]) for k in KEYS)
    )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(
            json.dumps(
                {
                    "command": " ".join(sys.argv),
                    "runs": runs,
                    "medians": med,
                    "pooled_medians": pool,
                    "paired_ratios": paired,
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
