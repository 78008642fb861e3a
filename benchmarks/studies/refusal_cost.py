"""The gateway's CPU per 429: what a refused request costs the core that also relays.

    python -m benchmarks.studies.refusal_cost --before-repo /tmp/before --rounds 8 \\
        --out benchmarks/out/refusal_cost.json

Two gateways (this checkout and, with --before-repo, another one, e.g. a git worktree)
take turns on core 0 with `server.max_in_flight: 1` before a FAKE upstream that never
frees the slot fast enough to matter; `wrk` on core 1 re-sends at once, so nearly every
request is refused in the HTTP parser's callback. CPU from /proc per run, divided by the
429s wrk counted. Rounds alternate which gateway goes first, so drift hits each alike;
the report gives each side's median and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.launch import REPO, exit_on_sigterm, free_port
from benchmarks.studies.gateway_capacity import (
    EVENTS,
    cpu_seconds,
    gateway_config,
    run_meta,
    run_wrk,
    started,
    wrk_script,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before-repo", type=Path, help="another checkout to compare with")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tiergate-refusal-"))
    up = free_port()
    fake = [py, "-m", "benchmarks.studies.fake_stream", "--port", str(up)]
    fake += ["--events", str(EVENTS), "--gap-ms", "5"]
    config = gateway_config(work, f"http://127.0.0.1:{up}", None, max_in_flight=1)
    script = wrk_script("fake", work)
    sides = {"now": REPO} | ({"before": a.before_repo} if a.before_repo else {})
    per: dict[str, list[float]] = {side: [] for side in sides}
    rows = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(started(fake, a.load_cpu, f"http://127.0.0.1:{up}/health"))
        urls, pids = {}, {}
        for side, repo in sides.items():
            port = free_port()
            cmd = [py, "-m", "serving.cli", "serve", "--config", str(config), "--port", str(port)]
            urls[side] = f"http://127.0.0.1:{port}"
            pids[side] = stack.enter_context(
                started(cmd, a.gateway_cpu, urls[side] + "/ready", cwd=repo)
            )
        for i in range(a.rounds):
            order = list(sides) if i % 2 == 0 else list(sides)[::-1]
            for side in order:
                cpu0 = cpu_seconds(pids[side])
                r = run_wrk(urls[side], script, a.concurrency, a.duration, a.load_cpu)
                cpu = cpu_seconds(pids[side]) - cpu0
                us = cpu / max(r["non_2xx"], 1) * 1e6
                per[side].append(us)
                rows.append({"round": i, "side": side, "cpu_s": cpu, "us_per_429": us} | r)
                print(
                    f"round {i} {side:<6} {r['req_s']:8.0f} req/s  {r['non_2xx']} refused  "
                    f"{us:5.1f} us of CPU per 429",
                    flush=True,
                )
    summary = {side: statistics.median(v) for side, v in per.items()}
    if "before" in per:
        pairs = [n / b for n, b in zip(per["now"], per["before"], strict=True)]
        summary["ratio_of_medians"] = summary["now"] / summary["before"]
        summary["median_of_pair_ratios"] = statistics.median(pairs)
        summary["pairs_now_lower"] = sum(r < 1 for r in pairs)
    print(json.dumps(summary))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = run_meta("refusal_cost", argv)
        a.out.write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
