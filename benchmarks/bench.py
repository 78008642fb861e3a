"""`tiergate bench`: load tests against any OpenAI-compatible endpoint, with SLO goodput,
a validity verdict per load point, and JSON/CSV/PNG/HTML reports.

    tiergate bench --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --concurrency 1 4 16 --duration 30 --warmup 5 --cooldown 2 \\
        --slo-ttft-ms 1000 --slo-tpot-ms 100 --out benchmarks/out/sweep
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shlex
import statistics
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
from tqdm import tqdm

from benchmarks import lengths, report
from benchmarks.client import ENDPOINTS, Target
from benchmarks.datasets import ChatTemplate, LengthDist, SyntheticText, sharegpt, synthetic
from benchmarks.metrics import SLO, bucket_throughput, measured, summarize
from benchmarks.runner import Load, RunResult, run
from benchmarks.verdict import RunFacts, Thresholds, judge
from serving.router.load import parse_vllm_metrics  # a pure parser, shared with the router


def add_arguments(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target")
    t.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    t.add_argument("--model", required=True)
    t.add_argument(
        "--endpoint",
        choices=ENDPOINTS,
        default="completions",
        help="/v1/completions, /v1/chat/completions or /v1/responses (the Responses API: "
        "the prompt as chat messages in its input, tokens from its last event's usage)",
    )
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    t.add_argument("--tokenizer", help="tokenizer folder or name (default: the model's, if local)")
    t.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    t.add_argument(
        "--metrics-url",
        action="append",
        default=None,
        help="Prometheus endpoint(s) with vLLM's prefix-cache counters (default: BASE/metrics "
        "and, behind tiergate, each engine's)",
    )
    load = p.add_argument_group("load (one of --concurrency / --rate; several values = a sweep)")
    mode = load.add_mutually_exclusive_group(required=True)
    mode.add_argument("--concurrency", type=int, nargs="+", help="closed loop")
    mode.add_argument("--rate", type=float, nargs="+", help="open loop, requests/s ('inf' ok)")
    load.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1 = Poisson")
    load.add_argument("--duration", type=float, help="seconds per point")
    load.add_argument("--requests", type=int, help="sessions per point")
    load.add_argument("--warmup", type=float, default=0.0, help="seconds left out at the start")
    load.add_argument("--cooldown", type=float, default=0.0, help="seconds left out at the end")
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", choices=["synthetic", "sharegpt"], default="synthetic")
    d.add_argument("--sharegpt-path", type=Path)
    d.add_argument("--input-len", default="128", help="128, uniform:LO:HI, normal:M:S, ...")
    d.add_argument("--output-len", default="128")
    d.add_argument(
        "--lengths",
        help="real (input, output) pairs instead of the two above: sharegpt[:MAX_TOTAL[:SCALE]]",
    )
    d.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt shares")
    d.add_argument("--turns", type=int, default=1, help="turns per session (chat history)")
    d.add_argument(
        "--turn-len",
        help="later turns' own user message (the history grows each turn); default: "
        "--input-len is each turn's whole conversation",
    )
    d.add_argument(
        "--live-sessions",
        type=int,
        default=0,
        help="closed loop: sessions open at once, each turn taken by the next free client "
        "(a think time; the engines must hold N conversations). Default: one per client",
    )
    d.add_argument(
        "--think-time",
        type=float,
        default=0.0,
        help="open loop (--rate): mean seconds between an answer and the user's next turn "
        "(exponential, seeded). Default 0: the next turn goes at once",
    )
    d.add_argument(
        "--prefix-groups",
        type=int,
        default=0,
        help="chat: requests in N interleaved groups, each with a system prompt of its own "
        "(--group-prefix tokens, after the --shared-prefix preamble every group shares); "
        "--input-len is then the question's length",
    )
    d.add_argument("--group-prefix", type=int, default=512, help="tokens of each group's own")
    d.add_argument(
        "--session-ids",
        choices=["session", "group", "none"],
        default="session",
        help="what x-session-id carries: each multi-turn session (default), the prefix "
        "group (an ideal partition), or nothing (the router must find the reuse itself)",
    )
    d.add_argument("--seed", type=int, default=0)
    s = p.add_argument_group("SLO and report")
    s.add_argument("--slo-ttft-ms", type=float)
    s.add_argument("--slo-tpot-ms", type=float)
    s.add_argument("--slo-e2e-ms", type=float)
    s.add_argument("--percentiles", default="50,90,95,99")
    s.add_argument("--max-error-rate", type=float, default=0.01)
    s.add_argument("--out", type=Path, required=True, help="folder for the report files")
    c = p.add_argument_group("capacity answer on the report (as `tiergate plan capacity`)")
    c.add_argument("--goodput-target", type=float, default=0.95, help="share within the SLO")
    c.add_argument("--peak-rps", type=float, help="peak traffic to plan for, requests/s")
    c.add_argument("--headroom", type=float, default=0.3, help="spare share at peak")
    c.add_argument("--gpus-per-replica", type=int, default=1)
    c.add_argument("--usd-per-gpu-hour", type=float)


def _auth(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def _local_model_dirs(args: argparse.Namespace) -> list[Path]:
    """Where the model's weights (and tokenizer) may already be on this machine."""
    cache = Path(
        os.environ.get("TIERGATE_MODEL_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tiergate" / "models"
    )
    names = [args.model]
    base = args.base_url.rstrip("/")
    try:  # behind tiergate: the engines' model names
        names += [
            e["model"]
            for e in httpx.get(base + "/tiergate/engines", headers=_auth(args), timeout=5).json()[
                "engines"
            ]
        ]
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    dirs = [cache / n for n in names]
    try:  # a bare vLLM names its weights folder in /v1/models
        dirs += [
            Path(m["root"])
            for m in httpx.get(base + "/v1/models", headers=_auth(args), timeout=5).json()["data"]
            if m.get("root")
        ]
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    return [d for d in dirs if (d / "tokenizer_config.json").is_file()]


def load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    if args.tokenizer:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    found = _local_model_dirs(args)
    if not found:
        raise SystemExit("tiergate bench: error: --tokenizer is needed (the model's tokenizer)")
    return AutoTokenizer.from_pretrained(found[0])


def make_sessions(args: argparse.Namespace, tokenizer, text, point: int, count: int | None):
    seed = args.seed + 1000 * point  # a fresh set per point: no cache hits across points
    if args.dataset == "sharegpt":
        if not args.sharegpt_path:
            raise SystemExit("tiergate bench: error: --sharegpt-path is needed")
        data = sharegpt(args.sharegpt_path, tokenizer, count or 10**9, seed=seed, turns=args.turns)
        return iter(data)
    chat = ChatTemplate(tokenizer) if args.endpoint in ("chat", "responses") else None
    return synthetic(
        text,
        count,
        LengthDist.parse(args.input_len),
        LengthDist.parse(args.output_len),
        seed=seed,
        shared_prefix=args.shared_prefix,
        turns=args.turns,
        chat=chat,
        pairs=lengths.parse(args.lengths) if args.lengths else None,
        groups=args.prefix_groups,
        group_prefix=args.group_prefix,
        session_ids=args.session_ids,
        turn_len=LengthDist.parse(args.turn_len) if args.turn_len else None,
    )


def prefix_counters(urls: list[str]) -> tuple[float, float] | None:
    """Summed vLLM prefix-cache hits and queries over the given /metrics endpoints."""
    hits = queries = 0.0
    seen = False
    for url in urls:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            continue
        if "vllm:prefix_cache_queries_total" not in text:
            continue  # not a vLLM engine (e.g. tiergate's own /metrics)
        load = parse_vllm_metrics(text)
        hits, queries, seen = hits + load.prefix_hits, queries + load.prefix_queries, True
    return (hits, queries) if seen else None


def metrics_urls(args: argparse.Namespace) -> list[str]:
    if args.metrics_url:
        return args.metrics_url
    base = args.base_url.rstrip("/")
    urls = [base + "/metrics"]
    try:  # behind tiergate: its engines' own counters
        engines = httpx.get(base + "/tiergate/engines", headers=_auth(args), timeout=5).json()[
            "engines"
        ]
        urls += [e["url"].rstrip("/") + "/metrics" for e in engines]
    except (httpx.HTTPError, ValueError, KeyError):
        pass
    return urls


def facts_of(result: RunResult, args: argparse.Namespace, cache: float | None) -> RunFacts:
    t0, t1 = result.window
    mine = sorted(
        (r for r in measured(result.records, t0, t1) if r.ttft is not None),
        key=lambda r: r.scheduled,
    )
    quarter = len(mine) // 4
    lag = sorted(result.loop_lag_ms)
    return RunFacts(
        loop_lag_p99_ms=lag[int(0.99 * (len(lag) - 1))] if lag else 0.0,
        client_cpu_share=result.client_cpu_s / max(result.wall, 1e-9),
        due=result.due,
        sent_on_time=result.sent_on_time,
        bucket_tok_s=bucket_throughput(result.records, t0, t1, 4) if t1 - t0 >= 4 else [],
        ttft_first_quarter_ms=statistics.median(r.ttft for r in mine[:quarter]) * 1000
        if quarter >= 5
        else None,
        ttft_last_quarter_ms=statistics.median(r.ttft for r in mine[-quarter:]) * 1000
        if quarter >= 5
        else None,
        cache_hit_rate=cache,
        expect_cache_hits=args.shared_prefix > 0 or args.turns > 1 or args.prefix_groups > 0,
        open_loop=result.load.kind == "rate",
    )


def cache_hit_rate(result: RunResult, before, after) -> float | None:
    cached = [r.cached_tokens for r in result.records if r.cached_tokens is not None]
    if cached:
        prompt = sum(r.prompt_tokens or 0 for r in result.records if r.cached_tokens is not None)
        return sum(cached) / prompt if prompt else None
    if before and after and after[1] > before[1]:
        return (after[0] - before[0]) / (after[1] - before[1])
    return None


async def run_point(args, target, tokenizer, text, load: Load, point: int) -> RunResult:
    sessions = make_sessions(args, tokenizer, text, point, load.count)
    total = None if load.count is None else load.count * args.turns
    with tqdm(total=total, desc=load.label, unit="req", leave=False, file=sys.stderr) as bar:
        return await run(target, sessions, load, on_done=lambda _: bar.update())


def _redacted(argv: list[str]) -> list[str]:
    """The command line as typed, minus the program name and any API key (reports are shared)."""
    args = argv[2:] if argv[1:2] == ["bench"] else argv[1:]
    out = []
    for i, arg in enumerate(args):
        if i and args[i - 1] == "--api-key":
            out.append("***")
        elif arg.startswith("--api-key="):
            out.append("--api-key=***")
        else:
            out.append(arg)
    return out


def _run_async(coro):
    try:
        import uvloop  # the client's own overhead is part of what a bench must keep low

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main(args: argparse.Namespace) -> int:
    if args.duration is None and args.requests is None:
        raise SystemExit("tiergate bench: error: give --duration or --requests")
    if args.turns > 1 and args.endpoint != "chat":
        raise SystemExit("tiergate bench: error: --turns needs --endpoint chat")
    if (args.turn_len or args.live_sessions) and args.turns < 2:
        raise SystemExit("tiergate bench: error: --turn-len and --live-sessions need --turns > 1")
    if args.think_time and (args.turns < 2 or not args.rate or args.think_time < 0):
        raise SystemExit(
            "tiergate bench: error: --think-time needs --rate and --turns > 1, and is "
            "seconds >= 0 (with --concurrency, --live-sessions gives a think time)"
        )
    if args.turn_len and args.dataset != "synthetic":
        raise SystemExit("tiergate bench: error: --turn-len needs --dataset synthetic")
    if args.live_sessions and (not args.concurrency or args.live_sessions < max(args.concurrency)):
        raise SystemExit(
            "tiergate bench: error: --live-sessions needs --concurrency, and a session per client"
        )
    if args.prefix_groups and (args.endpoint != "chat" or args.turns > 1):
        raise SystemExit("tiergate bench: error: --prefix-groups needs --endpoint chat, one turn")
    if args.lengths:
        if args.dataset != "synthetic":
            raise SystemExit("tiergate bench: error: --lengths needs --dataset synthetic")
        try:
            lengths.parse(args.lengths)
        except ValueError as exc:
            raise SystemExit(f"tiergate bench: error: {exc}") from exc
    ps = tuple(float(p) for p in args.percentiles.split(","))
    slo = SLO(
        *(
            None if v is None else v / 1000
            for v in (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
        )
    )
    thresholds = Thresholds(max_error_rate=args.max_error_rate)
    tokenizer = load_tokenizer(args)
    text = SyntheticText(tokenizer) if args.dataset == "synthetic" else None
    target = Target(args.base_url, args.model, args.endpoint, args.api_key, args.timeout)
    urls = metrics_urls(args)
    kind, values = ("concurrency", args.concurrency) if args.concurrency else ("rate", args.rate)
    points = []
    for i, value in enumerate(values):
        load = Load(
            kind,
            float(value),
            args.duration,
            args.requests,
            args.warmup,
            args.cooldown,
            args.burstiness,
            args.seed + i,
            args.live_sessions,
            args.think_time,
        )
        before = prefix_counters(urls)
        result = _run_async(run_point(args, target, tokenizer, text, load, i))
        cache = cache_hit_rate(result, before, prefix_counters(urls))
        t0, t1 = result.window
        summary = summarize(result.records, t0, t1, slo=slo, ps=ps)
        facts = facts_of(result, args, cache)
        verdict = judge(summary, facts, ps, thresholds)
        if result.ran_out:
            verdict["status"] = "warn"
            verdict["reasons"].append("the dataset ran out before the duration ended")
        points.append(
            {
                "load": asdict(load),
                "window": [t0, t1],
                "summary": summary,
                "facts": asdict(facts),
                "verdict": verdict,
                "records": result.records,
            }
        )
        print(report.point_line(load.label, summary, verdict), flush=True)
    run_doc = {
        "meta": {
            "command": "tiergate bench " + shlex.join(_redacted(sys.argv)),
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "target": {"base_url": args.base_url, "model": args.model, "endpoint": args.endpoint},
            "dataset": {
                "kind": args.dataset,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "lengths": args.lengths,
                "shared_prefix": args.shared_prefix,
                "turns": args.turns,
                "turn_len": args.turn_len,
                "live_sessions": args.live_sessions,
                "think_time": args.think_time,
                "prefix_groups": args.prefix_groups,
                "group_prefix": args.group_prefix,
                "session_ids": args.session_ids,
                "seed": args.seed,
            },
            "load_kind": kind,
            "slo": slo.describe(),
            "slo_s": asdict(slo),
            "plan": {
                "goodput_target": args.goodput_target,
                "peak_rps": args.peak_rps,
                "headroom": args.headroom,
                "gpus_per_replica": args.gpus_per_replica,
                "usd_per_gpu_hour": args.usd_per_gpu_hour,
            },
            "percentiles": list(ps),
        },
        "points": points,
    }
    files = report.write_all(run_doc, args.out)
    print(f"report: {args.out / 'report.html'} ({len(files)} files)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiergate bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return p
