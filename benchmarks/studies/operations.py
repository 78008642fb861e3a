"""Operations under load, counted: engines killed, engines replaced, routers replaced.

Two real CPU engines serve one tier (configs/tiers-cpu.yaml); C clients send
alternately streamed and non-streamed chats (`ignore_eos`, fixed length) the whole time.

    python -m benchmarks.studies.operations failover --rounds 3   # kill A, wait, kill B; x3
    python -m benchmarks.studies.operations rolling               # replace A then B (drain)
    python -m benchmarks.studies.operations router-rolling        # 2 gateways, one at a time

`router-rolling` runs two more gateways in front of the first one's engines (by URL),
behind a small TCP balancer here that sends each new connection to the next gateway
that accepts it (what a Service does with a pod that stopped listening). Each restarted
gateway gets SIGTERM, drains (server.drain_timeout), and is started again.

Every request is classified: non-streamed ok/failed, stream with [DONE] (clean, or
with the error event) or without, and refusals (429/503) split by whether some engine
was ready when the request was sent (polled every 0.2 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

from benchmarks.launch import REPO, GatewayProcess, exit_on_sigterm, free_port

CONFIG = REPO / "configs" / "tiers-cpu.yaml"
MODEL = "smollm2-small"


class Load:
    """C closed-loop clients, one new connection per request (as through a balancer)."""

    def __init__(self, url: str, concurrency: int, tokens: int) -> None:
        self.url, self.concurrency, self.tokens = url, concurrency, tokens
        self.counts: Counter[str] = Counter()
        self.ready_now = True  # some engine ready (kept by the poller)
        self.stop = asyncio.Event()

    async def one(self, client: httpx.AsyncClient, i: int) -> None:
        stream = i % 2 == 1
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Story number {i}."}],
            "max_tokens": self.tokens,
            "ignore_eos": True,
            "stream": stream,
        }
        ready = self.ready_now
        try:
            if not stream:
                r = await client.post(self.url + "/v1/chat/completions", json=body)
                if r.status_code == 200:
                    self.counts["plain ok"] += 1
                elif r.status_code in (429, 503):
                    self.counts[
                        f"refused {r.status_code} ({'a' if ready else 'no'} engine ready)"
                    ] += 1
                else:
                    self.counts[f"plain failed {r.status_code}"] += 1
                return
            async with client.stream("POST", self.url + "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    kind = "refused" if r.status_code in (429, 503) else "stream failed"
                    note = f" ({'a' if ready else 'no'} engine ready)" if kind == "refused" else ""
                    self.counts[f"{kind} {r.status_code}{note}"] += 1
                    return
                events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
            if not events or events[-1] != "[DONE]":
                self.counts["stream without [DONE]"] += 1
            elif any('"error"' in e for e in events):
                self.counts["stream: error event + [DONE]"] += 1
            else:
                self.counts["stream ok"] += 1
        except httpx.HTTPError as exc:
            self.counts[f"transport error {type(exc).__name__}"] += 1

    async def client(self, c: int) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            for n in itertools.count():
                if self.stop.is_set():
                    return
                await self.one(client, c + n * self.concurrency)

    async def poll(self, admin: str) -> None:
        async with httpx.AsyncClient(timeout=5) as client:
            while not self.stop.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    engines = (await client.get(admin + "/tiergate/engines")).json()["engines"]
                    self.ready_now = any(e["ready"] for e in engines)
                await asyncio.sleep(0.2)


async def engines(admin: str) -> dict[str, dict]:
    async with httpx.AsyncClient(timeout=10) as client:
        listed = (await client.get(admin + "/tiergate/engines")).json()["engines"]
    return {e["name"]: e for e in listed}


async def wait_ready(
    admin: str, name: str, old_pid: int | None = None, timeout: float = 600
) -> float:
    """Until `name` is ready (and, after a kill, running as a new process)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        with contextlib.suppress(httpx.HTTPError):
            engine = (await engines(admin))[name]
            if engine["ready"] and engine["pid"] != old_pid:
                return time.monotonic() - start
        await asyncio.sleep(0.5)
    raise TimeoutError(f"engine {name} not ready after {timeout}s")


async def failover(load: Load, admin: str, rounds: int, log: list[str]) -> None:
    for r in range(rounds):
        for name in ("smollm2-a", "smollm2-b"):
            await asyncio.sleep(5)
            pid = (await engines(admin))[name]["pid"]
            os.kill(pid, signal.SIGKILL)
            took = await wait_ready(admin, name, old_pid=pid)
            log.append(f"round {r + 1}: killed {name} (pid {pid}); back in {took:.0f} s")
            print(log[-1], flush=True)


async def rolling(load: Load, admin: str, log: list[str]) -> None:
    async with httpx.AsyncClient(timeout=900) as client:
        for name in ("smollm2-a", "smollm2-b"):
            await asyncio.sleep(5)
            r = await client.post(f"{admin}/tiergate/engines/{name}/restart")
            log.append(f"replaced {name}: {r.status_code} {r.text}")
            print(log[-1], flush=True)
    await asyncio.sleep(5)


async def balancer(port: int, backends: list[int]) -> asyncio.Server:
    """Each new connection goes to the next backend that accepts it."""
    turn = itertools.count()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(Exception):
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = next(turn)
        for k in range(len(backends)):
            backend = backends[(start + k) % len(backends)]
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", backend)
                break
            except OSError:
                continue
        else:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def router_rolling(gateways: list[GatewayProcess], log: list[str]) -> None:
    for gw in gateways:
        await asyncio.sleep(5)
        started = time.monotonic()
        code = await asyncio.to_thread(gw.stop, signal.SIGTERM, 120)
        stopped = time.monotonic() - started
        await asyncio.to_thread(gw.start)
        await asyncio.to_thread(gw.wait_ready, 120)
        log.append(
            f"restarted gateway :{gw.port}: drained and exited {code} in {stopped:.1f} s, "
            f"ready again {time.monotonic() - started:.1f} s after SIGTERM"
        )
        print(log[-1], flush=True)
    await asyncio.sleep(5)


def external_config(folder: Path, urls: dict[str, str]) -> Path:
    """The same tiers with the engines by URL; the tiers' limits need a tokenizer, which
    external engines do not bring: the prepared model folder's."""
    data = yaml.safe_load(CONFIG.read_text())
    for engine in data["engines"]:
        engine["url"] = urls[engine["name"]]
    cache = Path(os.environ.get("TIERGATE_MODEL_CACHE", Path.home() / ".cache/tiergate/models"))
    for tier in data["tiers"]:
        tier["tokenizer"] = str(cache / data["engines"][0]["model"])
    path = folder / "external.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


async def run(a: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="tiergate-ops-"))
    log: list[str] = []
    with GatewayProcess(CONFIG, work / "main.log") as main:
        main.wait_ready(600)
        for name in ("smollm2-a", "smollm2-b"):
            await wait_ready(main.url, name)
        target, fronts = main.url, []
        server = None
        if a.scenario == "router-rolling":
            urls = {n: e["url"] for n, e in (await engines(main.url)).items()}
            config = external_config(work, urls)
            fronts = [GatewayProcess(config, work / f"front{i}.log").start() for i in range(2)]
            for gw in fronts:
                gw.wait_ready(120)
            port = free_port()
            server = await balancer(port, [gw.port for gw in fronts])
            target = f"http://127.0.0.1:{port}"
        load = Load(target, a.concurrency, a.tokens)
        tasks = [asyncio.create_task(load.client(c)) for c in range(a.concurrency)]
        tasks.append(asyncio.create_task(load.poll(main.url)))
        started = time.monotonic()
        try:
            if a.scenario == "failover":
                await failover(load, main.url, a.rounds, log)
            elif a.scenario == "rolling":
                await rolling(load, main.url, log)
            else:
                await router_rolling(fronts, log)
        finally:
            load.stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                server.close()
            for gw in fronts:
                gw.stop()
    return {
        "scenario": a.scenario,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "concurrency": a.concurrency,
        "tokens": a.tokens,
        "seconds": round(time.monotonic() - started, 1),
        "events": log,
        "counts": dict(sorted(load.counts.items())),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=["failover", "rolling", "router-rolling"])
    p.add_argument("--concurrency", type=int, default=12)
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    exit_on_sigterm()
    result = asyncio.run(run(a))
    print(json.dumps(result, indent=1))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
