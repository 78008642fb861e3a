"""`server.workers` > 1: N gateway processes on one port beside one engine supervisor.

A Python process relays on one core at most, so a host with more cores runs one
gateway worker per core. Each worker binds the same port with SO_REUSEPORT and the
kernel spreads connections across them; this process starts the engines, then the
workers, restarts a worker that dies, and stops everything on SIGTERM/SIGINT.

What is shared between workers, and what stays per worker (and why):
- Engines: one supervisor here runs them, each on a port fixed for its lifetime, so
  workers reach them as external URLs, exactly like engines on a Kubernetes Service.
  Readiness and load come from each worker's own /health polls and /metrics scrapes:
  an engine's load is what the engine reports, the same for every worker, at most one
  scrape interval old.
- Admission (`server.max_in_flight`), the refusal budget (`server.max_refusals_s`)
  and the per-replica in-flight limit (`router.spill.max_in_flight`) are divided by N:
  each worker holds its share, so together they hold the configured totals with no
  shared counter (no lock, no IPC) on the hot path. SO_REUSEPORT hashes connections
  evenly, so the shares stay balanced; a worker that gets more than its share refuses
  early rather than overfilling an engine.
- Circuit breakers and retry budgets stay per worker: each learns a replica's failures
  from its own traffic. The cost is up to N x `breaker.failures` failed attempts before
  every worker has opened; the gain is no cross-process state to corrupt or wait on.
- Metrics: prometheus_client's multiprocess mode (files in a folder made here); any
  worker's /metrics sums every worker's counters (serving/metrics.py). The supervisor's
  own series (engine restarts) are in its log and not on /metrics in this mode.
- Affinity rings are computed from the same config by each worker, so a session key
  maps to the same replica whichever worker takes the connection.
- `server.front`: each worker starts its own front on its own SO_REUSEPORT socket, so
  the kernel spreads connections across the fronts and each front refuses at its
  worker's share of `server.max_in_flight` (counted exactly, as with one worker). A
  worker's front stops with it (STOP, or the channel's end when the worker dies) and
  the restarted worker starts a new one.
- Planned engine restarts (`POST /tiergate/engines/NAME/restart` on any worker) are the
  parent's: a control socket and a draining flag per engine in the work folder
  (serving/restart_control.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import pickle
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from serving.config import Settings

log = logging.getLogger("tiergate.workers")


def worker_settings(
    settings: Settings,
    urls: dict[str, str],
    workers: int,
    kv_events: dict[str, tuple[str | None, str | None]] | None = None,
) -> Settings:
    """One worker's settings: every engine by URL (and its KV events, where the parent's
    engines publish them), admission limits divided by N."""
    kv_events = kv_events or {}

    def share(limit: int) -> int:
        return math.ceil(limit / workers) if limit else 0

    server = settings.server.model_copy(
        update={
            "workers": 1,
            "max_in_flight": share(settings.server.max_in_flight),
            "max_refusals_s": share(settings.server.max_refusals_s),
        }
    )
    spill = settings.router.spill.model_copy(
        update={"max_in_flight": share(settings.router.spill.max_in_flight)}
    )
    return settings.model_copy(
        update={
            "engines": [
                e.model_copy(
                    update={
                        "url": urls[e.name],
                        "kv_events": kv_events.get(e.name, (e.kv_events, e.kv_replay))[0],
                        "kv_replay": kv_events.get(e.name, (e.kv_events, e.kv_replay))[1],
                    }
                )
                if e.name in urls
                else e
                for e in settings.engines
            ],
            "server": server,
            "router": settings.router.model_copy(update={"spill": spill}),
            "validate_engine_args": False,
        }
    )


async def run_workers(settings: Settings, model_dirs: dict[str, Path]) -> int:
    """The parent: engines, then N workers; returns the exit code."""
    from prometheus_client.multiprocess import mark_process_dead

    from serving.app import build_registry
    from serving.cli import banner
    from serving.engines import process
    from serving.engines.supervisor import EngineStartError, Supervisor
    from serving.metrics import GatewayMetrics
    from serving.restart_control import ParentControl
    from serving.upstream.client import UpstreamClient

    n = settings.server.workers
    host = settings.server.host
    registry = build_registry(settings)
    ports = {e.name: process.free_port() for e in settings.engines if e.supervised}
    supervisor = Supervisor(settings, registry, model_dirs, GatewayMetrics(), ports=ports)
    http = UpstreamClient(settings.timeouts, 16)
    await http.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    work = Path(tempfile.mkdtemp(prefix="tiergate-workers-"))
    procs: dict[int, asyncio.subprocess.Process] = {}
    pumps: list[asyncio.Task] = []
    stopping = asyncio.ensure_future(stop.wait())
    control: ParentControl | None = None
    try:
        supervisor.start(http)
        started = asyncio.ensure_future(supervisor.wait_started())
        await asyncio.wait({started, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            return 0
        try:
            started.result()
        except EngineStartError as exc:
            log.error("start-up failed, stopping everything: %s", exc)
            return 1
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        urls |= {e.name: e.url for e in settings.engines if e.url is not None}
        port = settings.server.port or process.free_port(host)
        job = work / "worker.pickle"
        kv = {ep.name: (ep.kv_events, ep.kv_replay) for ep in registry.endpoints if ep.kv_events}
        one = worker_settings(settings, urls, n, kv)
        (work / "metrics").mkdir()
        control = ParentControl(settings, supervisor, work)
        await control.start()
        parent = (sorted(ports), control.socket, control.flags)
        job.write_bytes(pickle.dumps((one, model_dirs, host, port, parent)))
        job.chmod(0o600)  # it holds the API keys
        env = {"PROMETHEUS_MULTIPROC_DIR": str(work / "metrics")}

        async def spawn(i: int) -> None:
            cmd = [sys.executable, "-m", "serving.workers", str(job)]
            procs[i] = await process.spawn(cmd, {**env, "TIERGATE_WORKER": str(i)})
            pumps.append(
                asyncio.create_task(process.pump_log(procs[i], f"[worker {i}]", sys.stderr.write))
            )

        for i in range(n):
            await spawn(i)
        base = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        while not stop.is_set():
            answer = await http.get(base + "/health", 1.0)
            if answer is not None and answer[0] == 200:
                break
            if any(p.returncode is not None for p in procs.values()):
                log.error("a worker exited during start-up")
                return 1
            await asyncio.sleep(0.2)
        else:
            return 0
        print(banner(host, port, registry.models()), flush=True)
        log.info("%d gateway workers on port %d", n, port)
        while not stop.is_set():
            waits = {asyncio.ensure_future(p.wait()): i for i, p in procs.items()}
            done, _ = await asyncio.wait({*waits, stopping}, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if stop.is_set():
                break
            for finished in done & set(waits):
                i = waits[finished]
                log.error("worker %d exited (%s); restarting it", i, procs[i].returncode)
                # its live gauges (requests in flight) would otherwise count forever
                mark_process_dead(procs[i].pid, str(work / "metrics"))
                await asyncio.sleep(1.0)
                await spawn(i)
        return 0
    finally:
        stopping.cancel()
        await asyncio.gather(
            # each worker drains its streams first (server.drain_timeout)
            *(process.terminate(p, settings.server.drain_timeout + 5) for p in procs.values()),
            return_exceptions=True,
        )
        for pump in pumps:
            pump.cancel()
        if control is not None:
            await control.close()
        await supervisor.stop()
        await http.close()
        shutil.rmtree(work, ignore_errors=True)


def worker_main(job: Path) -> int:
    """One worker: the gateway app on the shared port, engines by URL."""
    from serving.api.server import bind, server_for
    from serving.app import create_app, uvicorn_config

    settings, model_dirs, host, port, (supervised, control, flags) = pickle.loads(job.read_bytes())
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    app = create_app(settings, model_dirs=model_dirs)
    app.state.parent_supervises = set(supervised)  # the parent's to restart, not ours
    app.state.parent_control = control  # ... asked over this socket
    app.state.parent_draining = flags  # ... whose flags say which one is draining
    # Under server.front, this worker's own front on its own share of the port.
    sock = bind(host, port, reuse_port=True)
    server, sockets, link = server_for(sock, uvicorn_config(app, settings), app, settings)

    async def serve() -> None:
        try:
            await server.serve(sockets=sockets)
        finally:
            if link is not None:
                await link.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(Path(sys.argv[1])))
