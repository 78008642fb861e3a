"""The supervisor: one vLLM process per configured engine, watched and restarted.

- start: launch every engine on a free port, stream its log with a prefix, wait
  for /health within timeouts.engine_start;
- watch: a crash marks the endpoint down at once, then restarts it with
  exponential backoff (restart.max_restarts in a row, then it stays failed);
- stop: SIGTERM then SIGKILL to each engine's process group, always.

If any engine fails its first start, `wait_started` reports it and the caller
stops everything: a half-started deployment is not left running.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from serving.config import EngineSettings, Settings
from serving.engines import process
from serving.engines.defaults import engine_args_env
from serving.metrics import GatewayMetrics
from serving.router.registry import Endpoint, EngineRegistry
from serving.tasks import cancel_and_wait
from serving.upstream.client import UpstreamClient
from serving.upstream.health import probe

log = logging.getLogger("tiergate.supervisor")


class EngineStartError(Exception):
    """An engine exited or stayed unhealthy during its first start."""


STARTING_GRACE = 3.0  # seconds of SIGTERM for an engine stopped while it starts


class EngineRunner:
    def __init__(
        self,
        engine: EngineSettings,
        endpoint: Endpoint,
        model_dir: Path,
        settings: Settings,
        metrics: GatewayMetrics,
        write_log: Callable[[str], None],
        port: int | None = None,
    ) -> None:
        self.engine = engine
        self.port = port  # fixed across restarts (workers reach it by URL), else a free one
        self.endpoint = endpoint
        self.model_dir = model_dir
        self.settings = settings
        self.metrics = metrics
        self.write_log = write_log
        self.args, self.env = engine_args_env(engine)
        # The KV-event sockets live as long as the runner (its restarts reuse them).
        self.kv_folder: str | None = None
        if settings.router.prefix.kv_events:
            self.kv_folder = tempfile.mkdtemp(prefix=f"tiergate-kv-{engine.name[:12]}-")
            self.args, endpoint.kv_events, endpoint.kv_replay = process.with_kv_events(
                self.args, self.kv_folder
            )
        self.proc: asyncio.subprocess.Process | None = None
        self.started = asyncio.get_running_loop().create_future()
        self.stopping = False
        self.replacing = False  # a planned restart (drain, stop, start), not a crash
        self.back: asyncio.Event = asyncio.Event()  # set each time it becomes ready

    async def run(self, http: UpstreamClient) -> None:
        restart = self.settings.restart
        backoff, failures = restart.initial_backoff, 0
        while not self.stopping:
            error, reached_ready = await self._run_once(http)
            if self.stopping:
                return
            if self.replacing:  # asked for: start again at once, no backoff, no failure
                self.replacing = False
                self.endpoint.prefix.forget()
                self.endpoint.restarts += 1
                self.metrics.engine_restarts.labels(self.engine.name).inc()
                continue
            self.endpoint.ready, self.endpoint.url, self.endpoint.state = False, None, "down"
            self.endpoint.prefix.forget()  # a new process starts with an empty cache
            self.endpoint.last_error = error
            log.error("engine %s: %s", self.engine.name, error)
            if not self.started.done():
                self.started.set_exception(EngineStartError(f"engine {self.engine.name}: {error}"))
                self.endpoint.state = "failed"
                return
            if reached_ready:  # it served before crashing: start the backoff afresh
                backoff, failures = restart.initial_backoff, 0
            failures += 1
            if failures > restart.max_restarts:
                log.error(
                    "engine %s: %d restarts in a row failed; giving up",
                    self.engine.name,
                    restart.max_restarts,
                )
                self.endpoint.state = "failed"
                return
            log.warning("engine %s: restarting in %.1fs", self.engine.name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, restart.max_backoff)
            self.endpoint.restarts += 1
            self.metrics.engine_restarts.labels(self.engine.name).inc()

    async def _run_once(self, http: UpstreamClient) -> tuple[str, bool]:
        """Run the engine until it exits; return why it ended and if it was ever ready."""
        port = self.port or process.free_port()
        cmd = process.vllm_command(self.model_dir, self.endpoint.model, port, self.args)
        self.endpoint.state = "starting"
        log.info("engine %s: starting on port %d: %s", self.engine.name, port, " ".join(cmd))
        with process.socket_dir(self.engine.name) as sockets:
            self.proc = await process.spawn(cmd, {**sockets, **self.env})
            return await self._watch(http, port)

    async def _watch(self, http: UpstreamClient, port: int) -> tuple[str, bool]:
        """Until the started engine exits; it is stopped on the way out, always."""
        assert self.proc is not None
        self.endpoint.pid = self.proc.pid
        pump = asyncio.create_task(
            process.pump_log(self.proc, f"[{self.engine.name}]", self.write_log)
        )
        try:
            url = f"http://127.0.0.1:{port}"
            if not await self._wait_healthy(http, url):
                return f"not healthy within {self.settings.timeouts.engine_start:.0f}s", False
            if self.proc.returncode is not None:
                return f"exited with code {self.proc.returncode} during start-up", False
            self.endpoint.url, self.endpoint.state, self.endpoint.ready = url, "ready", True
            self.back.set()
            if not self.started.done():
                self.started.set_result(None)
            code = await self.proc.wait()
            # At once, before the sweep of its group: no request may be sent to it, what
            # its cache held is gone with it, and it is "down" (expected back: requests
            # are held by router.wait_ready_s, not refused while the sweep runs).
            self.endpoint.ready, self.endpoint.state = False, "down"
            self.endpoint.prefix.forget()
            return f"exited with code {code}", True
        finally:
            await process.terminate(self.proc, self.settings.timeouts.engine_stop)
            await asyncio.wait({pump}, timeout=2)
            pump.cancel()

    async def _wait_healthy(self, http: UpstreamClient, url: str) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.timeouts.engine_start
        assert self.proc is not None
        while loop.time() < deadline and self.proc.returncode is None:
            if await probe(http, url, timeout=2.0):
                return True
            await asyncio.sleep(0.5)
        return self.proc.returncode is not None  # exited: reported by the caller

    def restarted(self, started: float) -> dict:
        """What a planned restart answers, `started` on time.monotonic()'s clock."""
        ep = self.endpoint
        return {
            "engine": self.engine.name,
            "state": ep.state,
            "restarts": ep.restarts,
            "seconds": round(time.monotonic() - started, 2),
        }

    async def replace(self, drain_timeout: float, ready_timeout: float) -> bool:
        """Drain, stop, start, ready: take no new requests, let the ones in flight finish
        (up to `drain_timeout`; streams still open then end with an error event and
        [DONE], as on any engine failure), stop the process, start a new one and wait
        until it is ready. Returns whether it came back within `ready_timeout`."""
        if self.proc is None or self.endpoint.state != "ready":
            raise RuntimeError(f"engine {self.engine.name} is {self.endpoint.state}")
        self.endpoint.ready, self.endpoint.state = False, "draining"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain_timeout
        while self.endpoint.in_flight and loop.time() < deadline:  # noqa: ASYNC110 (a plain counter)
            await asyncio.sleep(0.05)
        log.info(
            "engine %s: drained (%d still in flight), restarting",
            self.engine.name,
            self.endpoint.in_flight,
        )
        self.back.clear()
        self.replacing = True
        await process.terminate(self.proc, self.settings.timeouts.engine_stop)
        try:
            await asyncio.wait_for(self.back.wait(), ready_timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        self.stopping = True
        starting = self.endpoint.state == "starting"
        self.endpoint.ready, self.endpoint.state = False, "stopped"
        if self.proc is not None:
            # One that has not served yet has nothing to drain: vLLM's API server caught
            # waiting for its EngineCore ignored SIGTERM until the SIGKILL 20 s later.
            grace = self.settings.timeouts.engine_stop
            await process.terminate(self.proc, min(grace, STARTING_GRACE) if starting else grace)
        if self.kv_folder is not None:
            shutil.rmtree(self.kv_folder, ignore_errors=True)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        registry: EngineRegistry,
        model_dirs: dict[str, Path],
        metrics: GatewayMetrics,
        write_log: Callable[[str], None] | None = None,
        ports: dict[str, int] | None = None,
    ) -> None:
        self.settings = settings
        self.ports = ports or {}
        self.registry = registry
        self.model_dirs = model_dirs
        self.metrics = metrics
        self.write_log = write_log or sys.stderr.write
        self.runners: list[EngineRunner] = []
        self.tasks: list[asyncio.Task] = []

    def start(self, http: UpstreamClient) -> None:
        """Launch every supervised engine in the background."""
        for engine in self.settings.engines:
            if not engine.supervised:
                continue
            runner = EngineRunner(
                engine,
                self.registry.get(engine.name),
                self.model_dirs[engine.name],
                self.settings,
                self.metrics,
                self.write_log,
                self.ports.get(engine.name),
            )
            self.runners.append(runner)
            self.tasks.append(asyncio.create_task(runner.run(http), name=f"engine-{engine.name}"))

    def runner(self, name: str) -> EngineRunner:
        for r in self.runners:
            if r.engine.name == name:
                return r
        raise KeyError(name)

    async def wait_started(self) -> None:
        """Return once every engine has been healthy once; raise EngineStartError if not."""
        await asyncio.gather(*(r.started for r in self.runners))

    async def stop(self) -> None:
        await asyncio.gather(*(r.stop() for r in self.runners), return_exceptions=True)
        await cancel_and_wait(self.tasks)
        for r in self.runners:  # nothing may survive, even a task cancelled mid-spawn
            if r.proc is not None:
                await process.terminate(r.proc, 0.1)
            if r.kv_folder is not None:
                shutil.rmtree(r.kv_folder, ignore_errors=True)
