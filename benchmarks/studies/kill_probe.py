"""Kill probe: one of two engines SIGKILLed under load; does a request get refused while
the other is ready? (RESULTS.md, "No refusal while a replica is ready").

`tiergate serve` with configs/tiers-cpu.yaml (two supervised engines, one per core);
`--clients` clients send `--requests` chats with `model: auto`, streamed and not in
turn; once a third of them have finished, the API server of the engine that took a
long seed prompt (so that its prefix index has blocks to lose) is SIGKILLed. The
supervisor restarts it; the next run starts once both are ready again.

    python -m benchmarks.studies.kill_probe --runs 3 --out benchmarks/out/kill_probe.json

Each request ends as: ok; a stream cut mid-way (the one error event, then [DONE]: the
engine died under it, nothing can move a stream that has started); or a refusal (any
HTTP error status). The bar is 0 refusals.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.launch import REPO, GatewayProcess, exit_on_sigterm


def _until_forgotten(gw: GatewayProcess, name: str, killed: float, limit: float = 5.0) -> float:
    """Seconds from the kill until /tiergate/engines shows the victim's index empty,
    polled every 20 ms (GatewayProcess.wait_for's 0.5 s steps would be the figure)."""
    while time.monotonic() - killed < limit:
        if gw.engine(name)["prefix_index"]["blocks"] == 0:
            return time.monotonic() - killed
        time.sleep(0.02)
    raise TimeoutError(f"{name}'s prefix index still held blocks {limit:.0f} s after the kill")


def one(url: str, i: int) -> str:
    stream = i % 2 == 1
    body = {
        "model": "auto",
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": stream,
        "messages": [{"role": "user", "content": f"Request {i}: tell me about rivers."}],
    }
    try:
        if not stream:
            r = httpx.post(url, json=body, timeout=300)
            return "ok" if r.status_code == 200 else f"refused_{r.status_code}"
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                return f"refused_{r.status_code}"
            events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
        if events[-1:] != ["[DONE]"]:
            return "stream_no_done"
        return "stream_cut" if any('"error"' in e for e in events) else "ok"
    except httpx.HTTPError as exc:
        return f"exception_{type(exc).__name__}"


NOTES = " ".join(f"Item {i} is filed under shelf {i % 7}." for i in range(90))


def probe(gw: GatewayProcess, n: int, clients: int, run: int) -> dict:
    url = gw.url + "/v1/chat/completions"
    # a long prompt first, so that the victim's prefix index has something to lose
    seed = {"role": "system", "content": f"Run {run}. {NOTES}"}
    body = {"model": "smollm2-large", "max_tokens": 1, "messages": [seed]}
    name = httpx.post(url, json=body, timeout=120).headers["x-tiergate-replica"]
    gw.wait_for(lambda: gw.engine(name)["prefix_index"]["blocks"] > 0, 10, "its events")
    victim = gw.engine(name)
    done = 0
    lock = threading.Lock()
    outcomes: Counter[str] = Counter()

    def send(i: int) -> None:
        nonlocal done
        outcome = one(url, i)
        with lock:
            outcomes[outcome] += 1
            done += 1

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(send, i) for i in range(n)]
        while done < n // 3:
            time.sleep(0.01)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at, killed = done, time.monotonic()
        index_gone_s = _until_forgotten(gw, name, killed)
        for f in futures:
            f.result()
    refusals = sum(v for k, v in outcomes.items() if k.startswith(("refused", "exception")))
    return {
        "victim": name,
        "requests": n,
        "killed_after": killed_at,
        "outcomes": dict(outcomes),
        "refusals": refusals,
        "index_gone_s": round(index_gone_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    rows = []
    log = Path(a.out).with_suffix(".log") if a.out else Path("/tmp/kill_probe.log")
    with GatewayProcess(REPO / "configs" / "tiers-cpu.yaml", log) as gw:
        for i in range(a.runs):
            gw.wait_for(lambda: all(e["ready"] for e in gw.engines()), 600, "both engines")
            row = probe(gw, a.requests, a.clients, i) | {"run": i}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["refusals"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
