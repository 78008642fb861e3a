"""What one gateway core relays: streamed requests/s, events/s, added latency, CPU per
1,000 events and the share of 429s, over a sweep of concurrency, next to a yardstick.

    python -m benchmarks.studies.gateway_capacity --concurrency 32 128 512 --duration 10 \\
        --out benchmarks/out/capacity.json

Layout on a 2-core host (change with --gateway-cpu / --load-cpu):
- core 0: the proxy under test, alone: tiergate (`tiergate serve`, routing, metrics and an
  API key on) or the yardstick relay (benchmarks/studies/yardstick.py);
- core 1: a FAKE upstream (benchmarks/studies/fake_stream.py: 16 chat events 5 ms apart, like
  decode steps, then usage and [DONE]; one clock serves every stream, so that the load
  core is not the limit) and the load generator, `wrk` (Debian's package).
"upstream" is the fake alone, for the added latency. Targets run interleaved at each
concurrency, so drift hits each alike. `--overload` also runs tiergate at 4x the
concurrency of its best point, with a probe that times the 429s apart from the 200s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import yaml

from benchmarks.launch import REPO, exit_on_sigterm, free_port

EVENTS = 16
KEY = "bench-key"
SETTLE_S = 1.0
PROBE_GAP_S = 0.05  # between one probe client's requests: samples, not load
TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its descendants (`server.front`'s process is the
    gateway's: it runs on the same core and its CPU is part of the gateway's cost; under
    `server.workers` the fronts are the workers' children)."""
    stats: dict[str, list[str]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                stats[proc.name] = _stat(int(proc.name))
            except (OSError, IndexError):
                continue  # gone meanwhile
    tree, total = {str(pid)}, 0
    while grown := {name for name, fields in stats.items() if fields[1] in tree} - tree:
        tree |= grown
    for name in tree & stats.keys():
        total += int(stats[name][11]) + int(stats[name][12])
    return total / TICKS


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextlib.contextmanager
def started(cmd: list[str], cpu: str, ready_url: str, cwd: Path = REPO) -> Iterator[int]:
    """Run `cmd` pinned to `cpu` until the block ends; yields its pid once ready_url is 200."""
    log = tempfile.NamedTemporaryFile(prefix="capacity-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        ["taskset", "-c", cpu, *cmd],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[:4]} exited: {Path(log.name).read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready_url, timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:4]} not ready: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.2)
        yield proc.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# Clients that honour Retry-After, as the `openai` SDK does (retry-after-ms first, then
# retry-after, obeyed exactly). wrk's delay() is asked when a connection is next
# writable, not right after its response(), and cannot tell which connection asks; so
# each 429 owes one wait, paid by the next request that wrk sends. In a closed loop the
# count of delayed re-sends is what matters.
HONOUR_RETRY_AFTER = """
local owed = {}
response = function(status, headers, body)
  if status == 429 then
    local ms = tonumber(headers["retry-after-ms"] or headers["Retry-After-Ms"])
    if not ms then
      ms = (tonumber(headers["retry-after"] or headers["Retry-After"]) or 1) * 1000
    end
    owed[#owed + 1] = ms
  end
end
delay = function()
  if #owed == 0 then return 0 end
  return table.remove(owed)
end
"""


def wrk_script(
    model: str, folder: Path, honour_retry_after: bool = False, key: str = KEY, tag: str = ""
) -> Path:
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": EVENTS,
            "stream": True,
        }
    )
    path = folder / (("chat-retry" if honour_retry_after else "chat") + tag + ".lua")
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {key}"\n'
        + (HONOUR_RETRY_AFTER if honour_retry_after else "")
    )
    return path


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text: str) -> dict:
    """wrk --latency output -> figures (latency in ms)."""

    def ms(value: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value).groups()
        return float(number) * _UNITS[unit]

    total = int(re.search(r"(\d+) requests in", text).group(1))
    seconds = ms(re.search(r"requests in ([\d.]+\w+),", text).group(1)) / 1000
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    errors = re.search(r"connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    dist = dict(re.findall(r"^\s+(\d+)%\s+([\d.]+\w+)\s*$", text, re.MULTILINE))  # "2.93s "
    refused = int(non2xx.group(1)) if non2xx else 0
    return {
        "requests": total,
        "seconds": seconds,
        "req_s": total / seconds,
        "ok_req_s": (total - refused) / seconds,
        "non_2xx": refused,
        "socket_errors": sum(map(int, errors.groups()[:3])) if errors else 0,
        "timeouts": int(errors.group(4)) if errors else 0,
        "p50_ms": ms(dist["50"]) if "50" in dist else float("nan"),
        "p99_ms": ms(dist["99"]) if "99" in dist else float("nan"),
        "raw": text if "50" not in dist else None,
    }


def run_wrk(
    url: str, script: Path, concurrency: int, duration: float, cpu: str, threads: int = 1
) -> dict:
    """One wrk run, after SETTLE_S: the previous run's connections close off the clock (a
    gateway tearing down 512 streams while 512 new clients arrive measured that too)."""
    time.sleep(SETTLE_S)
    cmd = ["taskset", "-c", cpu, "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{duration:g}s"]
    cmd += ["--latency", "--timeout", "10s", "-s", str(script), url + "/v1/chat/completions"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = parse_wrk(out)
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    r["wrk_cpu_share"] = used / r["seconds"] if r["seconds"] else None  # of the load core
    return r


def tenant_key(db: Path | str) -> str:
    """A tenant with every limit on but too high to bite: the checks run, none refuses.
    `db`: the SQLite file, or a postgresql:// URL."""
    from serving.tenants.pg_store import PgAdmin
    from serving.tenants.store import Tenant, TenantStore

    opened = PgAdmin(db) if isinstance(db, str) else TenantStore(db)
    with opened as store:
        store.set_tenant(
            Tenant("bench", (), rpm=10**9, tpm=10**12, max_concurrency=10**6, budget_tokens=10**15)
        )
        return store.create_key("bench", "wrk")


def gateway_config(
    folder: Path,
    upstream: str,
    tokenizer: Path | None,
    max_in_flight: int = 0,
    tenancy: Path | str | None = None,
    server: dict | None = None,
    replicas: int = 1,
) -> Path:
    """`tenancy`: a SQLite file, or a postgresql:// URL, turns tenancy on."""
    names = ["fake"] if replicas == 1 else [f"fake-{i}" for i in range(replicas)]
    tier = {"name": "fake", "model": "fake", "engines": names}
    if tokenizer:
        tier["tokenizer"] = str(tokenizer)
    config = {
        "server": {"api_keys": [KEY], "log_level": "warning"}
        | ({"max_in_flight": max_in_flight} if max_in_flight else {})
        | (server or {}),
        "engines": [{"name": n, "model": "fake", "url": upstream} for n in names],
        "tiers": [tier],
        # the fake holds any number of streams; the default 128 per replica is for vLLM
        "router": {"rules": {"default_tier": "fake"}, "spill": {"max_in_flight": 1024}},
    }
    if isinstance(tenancy, str):
        config["tenancy"] = {"enabled": True, "database_url": tenancy}
    elif tenancy is not None:
        config["tenancy"] = {"enabled": True, "db": str(tenancy)}
    folder.mkdir(exist_ok=True)
    name = {None: "tiergate", str: "tiergate-tenancy-pg"}.get(
        tenancy if tenancy is None else type(tenancy), "tiergate-tenancy"
    )
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


FRONT = {"front": True}  # server.front: refusals in a process of their own, same core
# The probe's 429s on a connection whose previous answer was a 200 (a subset of its
# 429s): the gateway must hand such a connection back to the front before it is read.
AFTER_200 = 4292
PROBES = 8  # clients, each one request at a time: enough 429s for a p99


async def probe_statuses(url: str, model: str, seconds: float) -> dict[int, list[float]]:
    """A few clients during an overload, one request at a time each: the time (ms) to a
    response's status line and headers, by status. Raw keep-alive sockets, so that the
    probe's own cost is tens of microseconds, not an HTTP library's milliseconds. They
    ignore Retry-After (PROBE_GAP_S apart), to sample the 429s; a 200 is read to its end.
    (5 ms apart, as in earlier runs, 8 clients added ~1,500 refusals/s of their own
    where 429s take 0.1 ms: as much as wrk's whole overload.)"""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\nauthorization: Bearer %s\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (url.encode(), KEY.encode(), len(body), body)
    )
    out: dict[int, list[float]] = {}
    end = time.monotonic() + seconds

    async def client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        previous = 0
        try:
            while time.monotonic() < end:
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                ms = (time.perf_counter() - t0) * 1000
                status = int(head.split(b" ", 2)[1])
                out.setdefault(status, []).append(ms)
                if status == 429 and previous == 200:  # the connection was just handed back
                    out.setdefault(AFTER_200, []).append(ms)
                previous = status
                length = re.search(rb"(?i)content-length: (\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                else:  # chunked: the stream ends with the last chunk
                    await reader.readuntil(b"\r\n0\r\n\r\n")
                await asyncio.sleep(PROBE_GAP_S)
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(PROBES)))
    return out


def start_probe(url: str, model: str, seconds: float, cpu: str) -> subprocess.Popen:
    """The probe in its own process. As root it runs SCHED_FIFO, so that the load core's
    queue (wrk and the fake) does not add to the latencies it reports: they are the
    gateway's."""
    cmd = [sys.executable, "-m", "benchmarks.studies.gateway_capacity", "--probe", url]
    cmd += ["--model", model, "--duration", str(seconds)]
    if os.geteuid() == 0 and shutil.which("chrt"):
        cmd = ["chrt", "-f", "10", *cmd]
    return subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=subprocess.PIPE, text=True)


def overload_summary(pairs: list[dict], statuses: dict[int, list[float]]) -> dict:
    """One side's overload rounds: goodput against its own peak per round, their median,
    timeouts, and the probe's latencies by status."""
    ratios = [p["overload"]["ok_req_s"] / p["peak"]["ok_req_s"] for p in pairs]
    return {
        "rounds": pairs,
        "goodput_vs_peak_per_round": ratios,
        "goodput_vs_peak": statistics.median(ratios),
        "timeouts": sum(p["overload"]["timeouts"] for p in pairs),
        "probe": {
            str(s): {
                "n": len(v),
                "p50_ms": percentile(v, 0.5),
                "p90_ms": percentile(v, 0.9),
                "p99_ms": percentile(v, 0.99),
                "max_ms": max(v),
            }
            for s, v in statuses.items()
        },
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_flags() -> str:
    from serving.engines.cpu import cpu_flags as flags

    wanted = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8"}
    return " ".join(sorted(flags() & wanted))


def run_meta(study: str, argv: list[str] | None, **extra: object) -> dict:
    """What a study's --out file records of its run: date, host, CPU flags, command."""
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_flags": cpu_flags(),
        **extra,
        "command": " ".join([f"python -m benchmarks.studies.{study}", *(argv or sys.argv[1:])]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32, 128, 512])
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument(
        "--targets",
        nargs="+",
        default=["upstream", "yardstick", "tiergate"],
        help="upstream, yardstick, tiergate, front (tiergate with server.front), tenancy "
        "(tiergate with a limited tenant's key), tenancy-pg (the same, keys and ledger in "
        "a throwaway PostgreSQL), and `before` / `front-before`: tiergate / front from "
        "--before-repo",
    )
    p.add_argument("--before-repo", type=Path, help="another checkout (e.g. a git worktree)")
    p.add_argument("--model", default="fake", help="'auto' routes with the tokenizer")
    p.add_argument("--tokenizer", type=Path, help="for --model auto (a prepared model folder)")
    p.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="the tier's replicas, all the one FAKE upstream: with 2+ the replica choice "
        "(prefix keys, the score) runs on every request",
    )
    p.add_argument("--overload", action="store_true", help="also tiergate at 4x its best point")
    p.add_argument(
        "--overload-before",
        action="store_true",
        help="with --overload-server and --before-repo: the same overload on --before-repo's "
        "gateway too, both in each round, in alternating order",
    )
    p.add_argument(
        "--overload-rounds",
        type=int,
        default=3,
        help="overload runs, each after the best point again (the ratio's median is reported)",
    )
    p.add_argument(
        "--overload-of",
        choices=["tiergate", "front"],
        default="tiergate",
        help="whose best point (and config) the overload run takes",
    )
    p.add_argument(
        "--clients",
        choices=["instant", "retry-after"],
        default="instant",
        help="in the overload run: re-send at once (wrk's way) or honour Retry-After (the SDK's)",
    )
    p.add_argument(
        "--max-in-flight", type=int, default=0, help="tiergate's server.max_in_flight (0: default)"
    )
    p.add_argument(
        "--overload-server",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="run the overload against a second tiergate with these server settings (e.g. "
        "max_in_flight=peak: the best point's concurrency), so that the sweep's peak is "
        "measured without them",
    )
    p.add_argument(
        "--fake",
        choices=["raw", "asgi"],
        default="raw",
        help="the FAKE upstream: raw (fake_stream.py, one clock for every stream, so the "
        "load core has room) or asgi (fake_server.py, a timer per event, which "
        "costs its core more)",
    )
    p.add_argument("--gateway-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument(
        "--wrk-threads",
        type=int,
        default=1,
        help="wrk's threads (each with its own event loop) for every run; with clients "
        "that honour Retry-After, each waiting connection is a timer that wrk's loop "
        "walks on every pass, so more threads keep the load core's cost down",
    )
    p.add_argument("--out", type=Path)
    p.add_argument("--probe", metavar="URL", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.probe:
        import uvloop

        print(json.dumps(uvloop.run(probe_statuses(a.probe, a.model, a.duration))))
        return 0
    if a.overload_before and not (a.overload_server and a.before_repo):
        p.error("--overload-before needs --overload-server and --before-repo")
    if not shutil.which("wrk"):
        print("gateway_capacity needs wrk: apt-get install wrk", file=sys.stderr)
        return 2
    exit_on_sigterm()
    os.sched_setaffinity(0, {int(a.load_cpu)})
    py = sys.executable
    work = Path(tempfile.mkdtemp(prefix="tiergate-capacity-"))
    # one script for every run, so that the Lua callbacks' cost on the load core is alike
    script = wrk_script(a.model, work, honour_retry_after=a.clients == "retry-after")
    names = ("upstream", "yardstick", "rawasgi", "raw", "tiergate", "front", "before", "tenancy")
    names += ("tenancy-pg",)
    names += ("limited", "limited-before", "front-before")
    ports = {t: free_port() for t in names}
    urls = {t: f"http://127.0.0.1:{port}" for t, port in ports.items()}
    module = "fake_stream" if a.fake == "raw" else "fake_server"
    fake = [py, "-m", f"benchmarks.studies.{module}", "--port", str(ports["upstream"])]
    fake += ["--events", str(EVENTS), "--gap-ms", "5"]
    yard = [py, "-m", "benchmarks.studies.yardstick", "--port", str(ports["yardstick"])]
    yard += ["--upstream", urls["upstream"]]
    config = gateway_config(
        work, urls["upstream"], a.tokenizer, a.max_in_flight, replicas=a.replicas
    )
    gate = [py, "-m", "serving.cli", "serve", "--config", str(config)]
    gate += ["--port", str(ports["tiergate"])]
    scripts = dict.fromkeys(names, script)
    if "tenancy" in a.targets:  # the same gateway, with tenants, limits and the ledger on
        db = work / "tenants.sqlite3"
        key = tenant_key(db)
        scripts["tenancy"] = wrk_script(a.model, work, a.clients == "retry-after", key, "-t")
        tconfig = gateway_config(work, urls["upstream"], a.tokenizer, a.max_in_flight, db)
        tenancy_gate = [py, "-m", "serving.cli", "serve", "--config", str(tconfig)]
        tenancy_gate += ["--port", str(ports["tenancy"])]
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        if "tenancy-pg" in a.targets:  # the same, with keys and the ledger in PostgreSQL
            from tests.postgres import PgServer, binaries

            if binaries() is None:
                print("tenancy-pg needs PostgreSQL: apt-get install postgresql", file=sys.stderr)
                return 2
            pg = PgServer(binaries()).start()
            stack.callback(pg.close)
            pkey = tenant_key(pg.url)
            scripts["tenancy-pg"] = wrk_script(
                a.model, work, a.clients == "retry-after", pkey, "-p"
            )
            pconfig = gateway_config(work, urls["upstream"], a.tokenizer, a.max_in_flight, pg.url)
            pg_gate = [py, "-m", "serving.cli", "serve", "--config", str(pconfig)]
            pg_gate += ["--port", str(ports["tenancy-pg"])]
        pids = {
            "upstream": stack.enter_context(started(fake, a.load_cpu, urls["upstream"] + "/health"))
        }
        if "yardstick" in a.targets:
            pids["yardstick"] = stack.enter_context(
                started(yard, a.gateway_cpu, urls["yardstick"] + "/health")
            )
        for kind, server in (("rawasgi", "asgi"), ("raw", "raw")):
            if kind in a.targets:
                cmd = [py, "-m", "benchmarks.studies.raw_relay", "--port", str(ports[kind])]
                cmd += ["--upstream", urls["upstream"], "--server", server]
                pids[kind] = stack.enter_context(
                    started(cmd, a.gateway_cpu, urls[kind] + "/health")
                )
        if "tiergate" in a.targets:
            pids["tiergate"] = stack.enter_context(
                started(gate, a.gateway_cpu, urls["tiergate"] + "/ready")
            )
        for kind, repo in (("front", None), ("front-before", a.before_repo)):
            if kind in a.targets:
                fconfig = gateway_config(
                    work / kind, urls["upstream"], a.tokenizer, a.max_in_flight, server=FRONT
                )
                front = [py, "-m", "serving.cli", "serve", "--config", str(fconfig)]
                front += ["--port", str(ports[kind])]
                pids[kind] = stack.enter_context(
                    started(front, a.gateway_cpu, urls[kind] + "/ready", cwd=repo or REPO)
                )
        if "tenancy" in a.targets:
            pids["tenancy"] = stack.enter_context(
                started(tenancy_gate, a.gateway_cpu, urls["tenancy"] + "/ready")
            )
        if "tenancy-pg" in a.targets:
            pids["tenancy-pg"] = stack.enter_context(
                started(pg_gate, a.gateway_cpu, urls["tenancy-pg"] + "/ready")
            )
        if "before" in a.targets:
            before = [*gate[:-1], str(ports["before"])]
            pids["before"] = stack.enter_context(
                started(before, a.gateway_cpu, urls["before"] + "/ready", cwd=a.before_repo)
            )
        for i, c in enumerate(a.concurrency):
            order = a.targets if i % 2 == 0 else a.targets[::-1]
            for target in order:
                pid = pids[target]
                cpu0 = cpu_seconds(pid)
                r = run_wrk(urls[target], scripts[target], c, a.duration, a.load_cpu, a.wrk_threads)
                r |= {"target": target, "concurrency": c, "cpu_s": cpu_seconds(pid) - cpu0}
                ok = r["ok_req_s"] * r["seconds"]
                r["events_s"] = r["ok_req_s"] * EVENTS
                r["cpu_ms_per_1k_events"] = (
                    r["cpu_s"] * 1000 / (ok * EVENTS / 1000)
                    if ok and target != "upstream"
                    else None
                )
                r["share_429"] = r["non_2xx"] / r["requests"] if r["requests"] else 0.0
                r["rss_mb"] = rss_mb(pid)
                rows.append(r)
                print(
                    f"c={c:<4} {target:<9} {r['req_s']:8.0f} req/s  ok {r['ok_req_s']:8.0f}  "
                    f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
                    f"429 {r['share_429']:5.1%}  timeouts {r['timeouts']}  "
                    f"cpu/1k ev {r['cpu_ms_per_1k_events'] or 0:5.1f} ms",
                    flush=True,
                )
        overload = None
        if a.overload and a.overload_of in pids:
            of = a.overload_of
            best = max((r for r in rows if r["target"] == of), key=lambda r: r["ok_req_s"])
            c = best["concurrency"] * 4
            target = "limited" if a.overload_server else of
            if a.overload_server:  # "peak" stands for the best point's concurrency
                extra = {
                    k: best["concurrency"] if v == "peak" else yaml.safe_load(v)
                    for k, v in (kv.split("=", 1) for kv in a.overload_server)
                }
                lconfig = gateway_config(
                    work / "limited",
                    urls["upstream"],
                    a.tokenizer,
                    server=(FRONT if of == "front" else {}) | extra,
                )
                limited = [py, "-m", "serving.cli", "serve", "--config", str(lconfig)]
                limited += ["--port", str(ports["limited"])]
                pids["limited"] = stack.enter_context(
                    started(limited, a.gateway_cpu, urls["limited"] + "/ready")
                )
            sides = {"now": target}
            if a.overload_before:  # the same limits, on --before-repo's gateway
                cmd = [*limited[:-1], str(ports["limited-before"])]
                pids["limited-before"] = stack.enter_context(
                    started(cmd, a.gateway_cpu, urls["limited-before"] + "/ready", a.before_repo)
                )
                sides["before"] = "limited-before"
            # Rounds alternate the best point with the overload, on the same (warm) gateway
            # process, so that the ratio compares neighbours on a host whose speed drifts;
            # at the best point's concurrency the limit never refuses (its 429s are kept).
            # With two sides, each round runs both, in alternating order.
            runs: dict[str, tuple[list, dict]] = {side: ([], {}) for side in sides}
            for i in range(a.overload_rounds):
                for side in list(sides) if i % 2 == 0 else list(sides)[::-1]:
                    t = sides[side]
                    pairs, statuses = runs[side]
                    peak_c = best["concurrency"]
                    again = run_wrk(urls[t], script, peak_c, a.duration, a.load_cpu, a.wrk_threads)
                    probe = start_probe(urls[t], a.model, a.duration, a.load_cpu)
                    cpu0 = cpu_seconds(pids[t])
                    r = run_wrk(urls[t], script, c, a.duration, a.load_cpu, a.wrk_threads)
                    r["gateway_cpu_share"] = (cpu_seconds(pids[t]) - cpu0) / r["seconds"]
                    out, _ = probe.communicate(timeout=a.duration + 30)
                    for k, v in json.loads(out).items():
                        statuses.setdefault(int(k), []).extend(v)
                    pairs.append({"peak": again, "overload": r})
                    print(
                        f"round ({side}): peak c={peak_c} {again['ok_req_s']:.0f} ok req/s, "
                        f"overload c={c} {r['ok_req_s']:.0f} ok req/s ({r['non_2xx']} "
                        f"refused), ratio {r['ok_req_s'] / again['ok_req_s']:.3f}; wrk's CPU "
                        f"{again['wrk_cpu_share']:.2f} / {r['wrk_cpu_share']:.2f} of the load core",
                        flush=True,
                    )
            overload = {
                "concurrency": c,
                "of": of,
                "server": extra if a.overload_server else {},
                "clients": a.clients,
                "sweep_peak_ok_req_s": best["ok_req_s"],
                **overload_summary(*runs["now"]),
            }
            if "before" in runs:
                overload["before"] = overload_summary(*runs["before"])
            brief = {k: v for k, v in overload.items() if k not in ("rounds", "before")}
            print(f"overload c={c}: {json.dumps(brief)}", flush=True)
            if "before" in overload:
                before = {k: v for k, v in overload["before"].items() if k != "rounds"}
                print(f"overload c={c}, before: {json.dumps(before)}", flush=True)
    print_table(rows)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        meta = run_meta("gateway_capacity", argv)
        a.out.write_text(json.dumps({"meta": meta, "rows": rows, "overload": overload}, indent=1))
    return 0


def print_table(rows: list[dict]) -> None:
    upstream = {r["concurrency"]: r for r in rows if r["target"] == "upstream"}
    print(
        "| c | target | req/s (2xx) | events/s | p50 ms (+ over upstream) | p99 ms | 429 | "
        "timeouts | CPU ms / 1k events | RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["concurrency"], r["target"])):
        base = upstream.get(r["concurrency"])
        added = f" (+{r['p50_ms'] - base['p50_ms']:.2f})" if base and r is not base else ""
        cpu = r["cpu_ms_per_1k_events"]
        print(
            f"| {r['concurrency']} | {r['target']} | {r['ok_req_s']:,.0f} | {r['events_s']:,.0f} | "
            f"{r['p50_ms']:.2f}{added} | {r['p99_ms']:.2f} | {r['share_429']:.1%} | "
            f"{r['timeouts']} | {'' if cpu is None else f'{cpu:.1f}'} | {r['rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
