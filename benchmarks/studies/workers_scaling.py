"""`server.workers` on a host with cores to spare: streamed req/s and CPU per 1,000 events
for N gateway workers, each N pinned to its own N cores, against FAKE upstreams on
cores of their own and `wrk` on the rest.

    python -m benchmarks.studies.workers_scaling --workers 1 2 4 8 --gateway-cpus 0-7 \\
        --upstream-cpus 8-11 --load-cpus 12-15 --out benchmarks/out/workers_scaling.json

The load is issue G's: 16 chat events 5 ms apart per stream (benchmarks/studies/
fake_stream.py, one FAKE per upstream core, all in one tier), `--per-worker` connections
per worker, routing, metrics and an API key on, no admission limit (so every request is
served and the figure is the relay's). Rounds alternate the order of N, so drift hits
each alike; each row also says how busy the upstream and load cores were, so a reader
can see when they, not the gateway, were the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.launch import exit_on_sigterm, free_port
from benchmarks.studies.gateway_capacity import (
    EVENTS,
    KEY,
    cpu_seconds,
    run_meta,
    run_wrk,
    started,
    wrk_script,
)


def cpus(spec: str) -> list[int]:
    """'0-3,8' -> [0, 1, 2, 3, 8]."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def config(folder: Path, upstreams: list[str], workers: int) -> Path:
    engines = [{"name": f"fake{i}", "model": "fake", "url": u} for i, u in enumerate(upstreams)]
    body = {
        "server": {"api_keys": [KEY], "log_level": "warning", "workers": workers}
        | {"max_in_flight": 0},
        "engines": engines,
        "tiers": [{"name": "fake", "model": "fake", "engines": [e["name"] for e in engines]}],
        "router": {"rules": {"default_tier": "fake"}, "spill": {"max_in_flight": 1 << 20}},
    }
    path = folder / f"tiergate-{workers}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--gateway-cpus", default="0-7", help="worker N runs on the first N")
    p.add_argument("--upstream-cpus", default="8-11", help="one FAKE upstream on each")
    p.add_argument("--load-cpus", default="12-15", help="wrk, one thread on each")
    p.add_argument("--per-worker", type=int, default=512, help="connections per worker")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    gate_cpus, up_cpus, load_cpus = cpus(a.gateway_cpus), cpus(a.upstream_cpus), cpus(a.load_cpus)
    if max(a.workers) > len(gate_cpus):
        p.error(f"--workers {max(a.workers)} needs that many --gateway-cpus")
    exit_on_sigterm()
    load = ",".join(map(str, load_cpus))
    os.sched_setaffinity(0, set(load_cpus))
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tiergate-workers-"))
    script = wrk_script("fake", work)
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        fakes: dict[int, int] = {}  # pid -> its core
        urls = []
        for core in up_cpus:
            port = free_port()
            cmd = [py, "-m", "benchmarks.studies.fake_stream", "--port", str(port)]
            cmd += ["--events", str(EVENTS), "--gap-ms", "5"]
            url = f"http://127.0.0.1:{port}"
            fakes[stack.enter_context(started(cmd, str(core), url + "/health"))] = core
            urls.append(url)
        for round_ in range(a.rounds):
            order = a.workers if round_ % 2 == 0 else a.workers[::-1]
            for n in order:
                port = free_port()
                gate = [py, "-m", "serving.cli", "serve", "--config", str(config(work, urls, n))]
                gate += ["--port", str(port)]
                url = f"http://127.0.0.1:{port}"
                mine = ",".join(map(str, gate_cpus[:n]))
                with started(gate, mine, url + "/ready") as pid:
                    time.sleep(1.0)  # every worker bound and polled its engines once
                    run_wrk(url, script, a.per_worker * n, 2, load, threads=len(load_cpus))
                    cpu0, up0, load0 = cpu_seconds(pid), _sum_cpu(fakes), children_cpu()
                    r = run_wrk(url, script, a.per_worker * n, a.duration, load, len(load_cpus))
                    cpu_s = cpu_seconds(pid) - cpu0
                    up_s, load_s = _sum_cpu(fakes) - up0, children_cpu() - load0
                ok = r["ok_req_s"] * r["seconds"]
                r |= {
                    "workers": n,
                    "round": round_,
                    "concurrency": a.per_worker * n,
                    "cpu_s": cpu_s,
                    "cpu_ms_per_1k_events": cpu_s * 1e6 / (ok * EVENTS) if ok else None,
                    "gateway_cores_busy": cpu_s / r["seconds"],
                    "upstream_cores_busy": up_s / r["seconds"],
                    "load_cores_busy": load_s / r["seconds"],
                }
                rows.append(r)
                print(
                    f"workers={n:<2} c={r['concurrency']:<5} ok {r['ok_req_s']:8.0f} req/s  "
                    f"p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms  errors "
                    f"{r['non_2xx'] + r['socket_errors']} timeouts {r['timeouts']}  cpu/1k ev "
                    f"{r['cpu_ms_per_1k_events'] or 0:5.1f} ms  busy: gateway "
                    f"{r['gateway_cores_busy']:.2f} upstream {r['upstream_cores_busy']:.2f}/"
                    f"{len(up_cpus)} load {r['load_cores_busy']:.2f}/{len(load_cpus)}",
                    flush=True,
                )
    summary = summarize(rows)
    print_summary(summary)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = run_meta("workers_scaling", argv, cpu=_cpu_model(), cores=os.cpu_count())
        a.out.write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))
    return 0


def _sum_cpu(pids: dict[int, int]) -> float:
    return sum(cpu_seconds(pid) for pid in pids)


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def summarize(rows: list[dict]) -> list[dict]:
    """Per N: median req/s over rounds, and its ratio to N=1's median (the scaling)."""
    by_n: dict[int, list[dict]] = {}
    for r in rows:
        by_n.setdefault(r["workers"], []).append(r)
    base = statistics.median(r["ok_req_s"] for r in by_n.get(1, by_n[min(by_n)]))
    out = []
    for n, rs in sorted(by_n.items()):
        req_s = statistics.median(r["ok_req_s"] for r in rs)
        out.append(
            {
                "workers": n,
                "ok_req_s": req_s,
                "ok_req_s_rounds": [r["ok_req_s"] for r in rs],
                "scaling_vs_1": req_s / base,
                "per_worker_req_s": req_s / n,
                "cpu_ms_per_1k_events": statistics.median(
                    r["cpu_ms_per_1k_events"] or 0 for r in rs
                ),
                "p99_ms": statistics.median(r["p99_ms"] for r in rs),
                "upstream_cores_busy": statistics.median(r["upstream_cores_busy"] for r in rs),
                "load_cores_busy": statistics.median(r["load_cores_busy"] for r in rs),
            }
        )
    return out


def print_summary(summary: list[dict]) -> None:
    print(
        "| workers | ok req/s (median; rounds) | x N=1 | per worker | CPU ms / 1k events | "
        "p99 ms | upstream cores busy | load cores busy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        rounds = ", ".join(f"{v:,.0f}" for v in s["ok_req_s_rounds"])
        print(
            f"| {s['workers']} | {s['ok_req_s']:,.0f} ({rounds}) | {s['scaling_vs_1']:.2f} | "
            f"{s['per_worker_req_s']:,.0f} | {s['cpu_ms_per_1k_events']:.1f} | "
            f"{s['p99_ms']:.1f} | {s['upstream_cores_busy']:.2f} | {s['load_cores_busy']:.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
