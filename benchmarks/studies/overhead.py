"""Gateway overhead: the same load through tiergate and straight to its engine.

Runs are interleaved (gateway, engine, engine, gateway, ...) in one sitting so
that drift on a noisy machine hits both sides alike. Reports median TTFT and
median per-round output throughput for each side, and their difference/ratio.

    python -m benchmarks.studies.overhead --config configs/default.yaml \\
        --out benchmarks/out/overhead.json

Tokens come from the server's `usage`, never from counting chunks. TTFT is the
time from sending the request to the first chunk that carries text.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from benchmarks.launch import REPO, GatewayProcess, exit_on_sigterm

_WORDS = (
    "river stone cloud garden lantern copper meadow violin harbor pepper candle "
    "mirror thunder orchard velvet compass falcon marble glacier saddle ember "
    "quartz willow ribbon anchor prairie beacon cinder tunnel walnut"
).split()


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    e2e: float = 0.0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class BatchResult:
    target: str
    concurrency: int
    wall: float
    requests: list[RequestResult] = field(default_factory=list)
    gateway_cpu_s: float | None = None  # CPU the gateway process spent on this batch
    gateway_calls: dict[str, int] | None = None  # its read/write syscalls and wake-ups

    @property
    def output_tps(self) -> float:
        return sum(r.completion_tokens for r in self.requests) / self.wall


def unique_prompt(rng: random.Random, words: int) -> str:
    """Distinct from the first word on, so the prefix cache cannot help either side."""
    return " ".join(rng.choice(_WORDS) for _ in range(words))


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}"
                await response.aread()
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                choices = event.get("choices") or []
                if result.ttft is None and choices and choices[0].get("text"):
                    result.ttft = time.perf_counter() - start
                if event.get("usage"):
                    result.completion_tokens = event["usage"]["completion_tokens"]
                if "error" in event:
                    result.error = event["error"].get("message")
        result.ok = result.error is None
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    result.e2e = time.perf_counter() - start
    return result


async def run_batch(
    client: httpx.AsyncClient,
    target: str,
    url: str,
    model: str,
    concurrency: int,
    n: int,
    max_tokens: int,
    rng: random.Random,
    prompt_words: int,
    extra: dict | None = None,
) -> BatchResult:
    bodies = [
        {
            "model": model,
            "prompt": unique_prompt(rng, prompt_words),
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            **(extra or {}),
        }
        for _ in range(n)
    ]
    slots = asyncio.Semaphore(concurrency)

    async def limited(body: dict) -> RequestResult:
        async with slots:
            return await stream_completion(client, url, body)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(b) for b in bodies))
    return BatchResult(target, concurrency, time.perf_counter() - start, list(results))


def summarize(batches: list[BatchResult], pair: tuple[str, str]) -> list[dict]:
    """Per concurrency: each side's medians, and pair[0] relative to pair[1]."""
    rows = []
    for c in sorted({b.concurrency for b in batches}):
        side = {}
        for target in pair:
            mine = [b for b in batches if b.concurrency == c and b.target == target]
            ttfts = [r.ttft for b in mine for r in b.requests if r.ok and r.ttft is not None]
            side[target] = {
                "requests": sum(len(b.requests) for b in mine),
                "errors": sum(not r.ok for b in mine for r in b.requests),
                "ttft_p50_ms": statistics.median(ttfts) * 1000,
                "output_tps_median": statistics.median(b.output_tps for b in mine),
                "output_tps_rounds": [round(b.output_tps, 1) for b in mine],
            }
            cpu = [b.gateway_cpu_s for b in mine if b.gateway_cpu_s is not None]
            if cpu:
                tokens = sum(r.completion_tokens for b in mine for r in b.requests if r.ok)
                side[target]["gateway_cpu_ms_per_1k_tokens"] = sum(cpu) * 1e6 / max(tokens, 1)
                calls = [b.gateway_calls for b in mine if b.gateway_calls]
                for key in CALLS if calls else ():
                    per_1k = sum(c[key] for c in calls) * 1000 / max(tokens, 1)
                    side[target][f"gateway_{key}_per_1k_tokens"] = round(per_1k, 1)
        g, e = side[pair[0]], side[pair[1]]
        # Round i's two batches ran next to each other (ABBA): on a host that drifts
        # within the run, their ratio is steadier than the ratio of the two medians.
        rounds = zip(g["output_tps_rounds"], e["output_tps_rounds"], strict=True)
        paired = [x / y for x, y in rounds]
        rows.append(
            {
                "concurrency": c,
                **{f"{k}_{t}": v for t, s in side.items() for k, v in s.items()},
                "ttft_added_ms": g["ttft_p50_ms"] - e["ttft_p50_ms"],
                "throughput_ratio": g["output_tps_median"] / e["output_tps_median"],
                "throughput_ratio_rounds": [round(r, 3) for r in paired],
                "throughput_ratio_paired_median": statistics.median(paired),
            }
        )
    return rows


def print_table(rows: list[dict], pair: tuple[str, str]) -> None:
    a, b = pair
    print(
        f"| C | TTFT p50 {b} | TTFT p50 {a} | added | tok/s {b} | tok/s {a} "
        f"| ratio {a}/{b} | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['concurrency']} | {r[f'ttft_p50_ms_{b}']:.1f} ms | "
            f"{r[f'ttft_p50_ms_{a}']:.1f} ms | {r['ttft_added_ms']:+.2f} ms | "
            f"{r[f'output_tps_median_{b}']:.1f} | {r[f'output_tps_median_{a}']:.1f} | "
            f"{r['throughput_ratio']:.3f} | {r[f'errors_{a}'] + r[f'errors_{b}']} |"
        )
    for r in rows:
        rounds = ", ".join(f"{x:.3f}" for x in r["throughput_ratio_rounds"])
        print(
            f"C={r['concurrency']}: {a}/{b} per round {rounds}; "
            f"median of the rounds {r['throughput_ratio_paired_median']:.3f}"
        )
        for side in pair:
            cpu = r.get(f"gateway_cpu_ms_per_1k_tokens_{side}")
            if cpu is not None:
                print(f"C={r['concurrency']}: {side} CPU {cpu:.1f} ms per 1,000 streamed tokens")
            calls = {k: r.get(f"gateway_{k}_per_1k_tokens_{side}") for k in CALLS}
            if None not in calls.values():
                print(
                    f"C={r['concurrency']}: {side} per 1,000 streamed tokens: "
                    + ", ".join(f"{v:.0f} {k}" for k, v in calls.items())
                )


Target = tuple[str, str, dict]  # (base URL, model, fields added to each request body)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


CALLS = ("reads", "writes", "wakeups")


def call_counts(pid: int) -> dict[str, int]:
    """The process's read and write syscalls (/proc/PID/io) and its threads' voluntary
    context switches, i.e. the times it slept and was woken (Linux). The per-token kernel
    cost is in these: each streamed token is one read from the engine and one write to
    the client."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    wakeups = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        wakeups += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", status, re.M)[1])
    return {"reads": int(io["syscr"]), "writes": int(io["syscw"]), "wakeups": wakeups}


async def measure(
    targets: dict[str, Target], args: argparse.Namespace, pids: dict[str, int] | None = None
) -> list[BatchResult]:
    """Interleave the two targets round by round (ABBA...), after an unmeasured warm-up.
    With `pids` (target -> process), that process's CPU is read over each of the
    target's batches."""
    pids = pids or {}
    rng = random.Random(args.seed)
    batches: list[BatchResult] = []
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
    names = list(targets)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        for name, (url, model, extra) in targets.items():
            await run_batch(client, name, url, model, 4, 4, 16, rng, args.prompt_words, extra)
        for c in args.concurrency:
            n = max(c * args.batches_per_slot, args.min_requests)
            tokens = args.max_tokens if c > 1 else args.max_tokens_c1
            for i in range(args.rounds):
                for name in names if i % 2 == 0 else names[::-1]:
                    url, model, extra = targets[name]
                    pid = pids.get(name)
                    cpu0 = cpu_seconds(pid) if pid else None
                    calls0 = call_counts(pid) if pid else None
                    batch = await run_batch(
                        client, name, url, model, c, n, tokens, rng, args.prompt_words, extra
                    )
                    if cpu0 is not None:
                        batch.gateway_cpu_s = cpu_seconds(pid) - cpu0
                        calls = call_counts(pid)
                        batch.gateway_calls = {k: calls[k] - calls0[k] for k in CALLS}
                    batches.append(batch)
                    print(
                        f"C={c} round {i + 1} {name}: {batch.output_tps:.1f} out tok/s, "
                        f"{len(batch.requests)} requests",
                        flush=True,
                    )
    return batches


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--config",
        type=Path,
        default=REPO / "configs" / "default.yaml",
        help="start `tiergate serve` with this config",
    )
    p.add_argument("--gateway-url", help="use a running gateway instead of starting one")
    p.add_argument("--engine-url", help="its engine (default: from /tiergate/engines)")
    p.add_argument("--gateway-pid", type=int, help="a running gateway's pid, for its CPU")
    p.add_argument(
        "--engine-pid",
        type=int,
        help="the --engine-url side's pid, for its CPU too: with a second gateway as "
        "--engine-url, two gateways (e.g. two commits) side by side against one engine",
    )
    p.add_argument(
        "--compare",
        choices=["engine", "auto", "interval"],
        default="engine",
        help="engine: gateway vs its engine directly; auto: model=auto vs the tier's model, "
        "both through the gateway; interval: requests with vLLM's stream_interval "
        "(--stream-interval tokens per event) vs without, both through the gateway",
    )
    p.add_argument(
        "--stream-interval",
        type=int,
        help="vLLM's per-request stream_interval (tokens per event), on both sides; with "
        "--compare interval, the one side's (default 2)",
    )
    p.add_argument("--model", help="the direct model name (default: the first listed)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--batches-per-slot", type=int, default=2)
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-tokens-c1", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    if args.compare == "interval" and (args.stream_interval or 2) < 2:
        p.error("--compare interval needs --stream-interval 2 or more")  # both sides: one
    exit_on_sigterm()

    gateway = GatewayUnderTest(args)
    with gateway as gateway_url:
        model = (
            args.model or httpx.get(gateway_url + "/v1/models", timeout=10).json()["data"][0]["id"]
        )
        if args.compare == "engine" and args.engine_url:  # any relay in front of an engine
            targets = {"gateway": (gateway_url, model, {}), "engine": (args.engine_url, model, {})}
        elif args.compare == "engine":
            engines = httpx.get(gateway_url + "/tiergate/engines", timeout=10).json()["engines"]
            engine = next(e for e in engines if e["model"] == model or e["name"] == model)
            targets = {
                "gateway": (gateway_url, model, {}),
                "engine": (engine["url"], engine["model"], {}),
            }
        elif args.compare == "auto":
            targets = {"auto": (gateway_url, "auto", {}), "direct": (gateway_url, model, {})}
        else:  # vLLM's per-request stream_interval: N tokens per event against one
            n = args.stream_interval or 2
            targets = {
                f"interval{n}": (gateway_url, model, {"stream_interval": n}),
                "interval1": (gateway_url, model, {}),
            }
        if args.stream_interval and args.compare != "interval":
            for _, _, extra in targets.values():
                extra["stream_interval"] = args.stream_interval
        pid = gateway.proc.proc.pid if gateway.proc is not None else args.gateway_pid
        pids = {name: pid for name in targets if name != "engine" and pid}
        if args.engine_pid and "engine" in targets:
            pids["engine"] = args.engine_pid
        batches = asyncio.run(measure(targets, args, pids))
    pair = tuple(targets)
    rows = summarize(batches, pair)
    print_table(rows, pair)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"summary": rows, "batches": [asdict(b) for b in batches]}, indent=1)
        )
    return 0


class GatewayUnderTest:
    """A running gateway: the one given, or one started (and stopped) here."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: GatewayProcess | None = None

    def __enter__(self) -> str:
        if self.args.gateway_url:
            return self.args.gateway_url
        log = Path(tempfile.mkdtemp(prefix="tiergate-bench-")) / "serve.log"
        self.proc = GatewayProcess(self.args.config, log).start().wait_ready()
        self.proc.wait_for(
            lambda: all(e["ready"] for e in self.proc.engines()), 600, "every engine"
        )
        print(f"started tiergate at {self.proc.url} (log: {log})", flush=True)
        return self.proc.url

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc.kill_survivors()


if __name__ == "__main__":
    raise SystemExit(main())
