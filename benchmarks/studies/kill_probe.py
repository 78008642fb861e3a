"""Kill probe: one of two engines loses its cache under load (SIGKILL, a planned restart,
or vLLM's AllBlocksCleared); is a request refused while the other is ready, and how soon
does the router forget what that engine held? (RESULTS.md, "No refusal while a replica
is ready").

`tiergate serve` with configs/tiers-cpu.yaml (two supervised engines, one per core, with
vLLM's dev endpoints on for `clear`); `--clients` clients send `--requests` chats with
`model: auto`, streamed and not in turn. First a long seed prompt, so that the victim's
prefix index holds blocks (the load's short chats fill no block of their own). Once a
third of the load has finished, `--event`:
- kill: the victim's API server gets SIGKILL; the supervisor restarts it;
- restart: `POST /tiergate/engines/NAME/restart` (drain, stop, start);
- clear: `POST /reset_prefix_cache?reset_running_requests=true` on the engine itself:
  its running requests are preempted and recomputed, and it publishes AllBlocksCleared.
The next run starts once both engines are ready again.

    python -m benchmarks.studies.kill_probe --runs 3 --out benchmarks/out/kill_probe.json
    python -m benchmarks.studies.kill_probe --event clear --out benchmarks/out/clear_probe.json

Each request ends as: ok (the whole answer: it ends at max_tokens); a stream cut mid-way
(the one error event, then [DONE]: the engine died under it, nothing can move a stream
that has started); a refusal (any HTTP error status); or, which the gateway should never
let through, an answer that ends early with no error (`answer_cut`, `stream_short`).
The bar is 0 refusals on a kill, and every request ok on a planned restart or a clear.
`index_gone_s`: from the kill, the clear's request, or (restart) the old process's exit,
until /tiergate/engines shows the victim's index empty.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import yaml

from benchmarks.launch import REPO, GatewayProcess, exit_on_sigterm

EVENTS = ("kill", "restart", "clear")


def _until_forgotten(gw: GatewayProcess, name: str, since: float, limit: float = 5.0) -> float:
    """Seconds from `since` until /tiergate/engines shows the victim's index empty,
    polled every 20 ms (GatewayProcess.wait_for's 0.5 s steps would be the figure)."""
    while time.monotonic() - since < limit:
        if gw.engine(name)["prefix_index"]["blocks"] == 0:
            return time.monotonic() - since
        time.sleep(0.02)
    raise TimeoutError(f"{name}'s prefix index still held blocks {limit:.0f} s on")


def _until_exited(pid: int, limit: float = 120.0) -> float:
    """When (time.monotonic()) the process `pid` is gone, polled every 20 ms."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic()
        except psutil.NoSuchProcess:
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"engine process {pid} still running {limit:.0f} s after the restart")


def strike(gw: GatewayProcess, victim: dict, event: str) -> tuple[float, Future | None, float]:
    """Do `event` to the victim. Returns when its cache was lost (time.monotonic()); for
    a restart, the pending answer of the restart call; for a clear, the seconds the
    engine took to answer it."""
    if event == "kill":
        os.kill(victim["pid"], signal.SIGKILL)
        return time.monotonic(), None, 0.0
    if event == "clear":
        url = victim["url"] + "/reset_prefix_cache?reset_running_requests=true"
        asked = time.monotonic()  # from the ask, not the answer: the stricter figure
        answer = httpx.post(url, timeout=30)
        if answer.status_code != 200 or answer.json().get("success") is not True:
            raise RuntimeError(f"reset_prefix_cache: {answer.status_code} {answer.text}")
        return asked, None, time.monotonic() - asked
    path = f"/tiergate/engines/{victim['name']}/restart"
    pool = ThreadPoolExecutor(1)  # the call returns once the engine is back
    restart = pool.submit(httpx.post, gw.url + path, timeout=600)
    pool.shutdown(wait=False)  # its thread ends with the call
    return _until_exited(victim["pid"]), restart, 0.0


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
            if r.status_code != 200:
                return f"refused_{r.status_code}"
            # ok means all of it: ignore_eos, so a whole answer ends at max_tokens
            return "ok" if r.json()["choices"][0]["finish_reason"] == "length" else "answer_cut"
        with httpx.stream("POST", url, json=body, timeout=300) as r:
            if r.status_code != 200:
                r.read()
                return f"refused_{r.status_code}"
            events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
        if events[-1:] != ["[DONE]"]:
            return "stream_no_done"
        if any('"error"' in e for e in events):
            return "stream_cut"
        return "ok" if any('"finish_reason":"length"' in e for e in events) else "stream_short"
    except httpx.HTTPError as exc:
        return f"exception_{type(exc).__name__}"


NOTES = " ".join(f"Item {i} is filed under shelf {i % 7}." for i in range(90))


def probe(gw: GatewayProcess, n: int, clients: int, run: int, event: str = "kill") -> dict:
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
        struck_after = done
        lost, restart, answered_s = strike(gw, victim, event)
        lost_after = done
        index_gone_s = _until_forgotten(gw, name, lost)
        for f in futures:
            f.result()
    if restart is not None:
        answer = restart.result()
        if answer.status_code != 200:
            raise RuntimeError(f"restart: {answer.status_code} {answer.text}")
    refusals = sum(v for k, v in outcomes.items() if k.startswith(("refused", "exception")))
    return {
        "event": event,
        "victim": name,
        "requests": n,
        "struck_after": struck_after,  # requests finished when the event was started
        "lost_after": lost_after,  # ... and when the cache was gone (restart: the exit)
        "outcomes": dict(outcomes),
        "refusals": refusals,
        "index_gone_s": round(index_gone_s, 3),
        "clear_answered_s": round(answered_s, 3) if event == "clear" else None,
    }


def passed(row: dict) -> bool:
    if row["event"] == "kill":
        return row["refusals"] == 0
    return row["outcomes"] == {"ok": row["requests"]}  # nothing cut, nothing refused


def config(event: str, folder: Path) -> Path:
    """The shipped layout; for `clear`, a copy in `folder` with vLLM's dev endpoints on
    (loopback only)."""
    shipped = REPO / "configs" / "tiers-cpu.yaml"
    if event != "clear":
        return shipped
    data = yaml.safe_load(shipped.read_text())
    for engine in data["engines"]:
        engine["env"]["VLLM_SERVER_DEV_MODE"] = "1"
    path = folder / "tiers.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--clients", type=int, default=12)
    p.add_argument("--event", choices=EVENTS, default="kill")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    rows = []
    log = Path(a.out).with_suffix(".log") if a.out else Path(f"/tmp/{a.event}_probe.log")
    with (
        tempfile.TemporaryDirectory(prefix="tg-probe-") as folder,
        GatewayProcess(config(a.event, Path(folder)), log) as gw,
    ):
        for i in range(a.runs):
            gw.wait_for(lambda: all(e["ready"] for e in gw.engines()), 600, "both engines")
            row = probe(gw, a.requests, a.clients, i, a.event) | {"run": i}
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    return 0 if all(passed(r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
