"""Planned engine restarts under `server.workers` > 1: the workers ask the parent.

The parent (serving/workers.py) supervises the engines; each worker reaches them by
URL and has no supervisor of its own. `POST /tiergate/engines/NAME/restart` on any
worker is forwarded over a unix socket in the parent's work folder, one JSON line
each way. The parent drains the engine across every worker, then replaces it:
- a flag file `draining/NAME` tells each worker's health poll to take the engine out
  of rotation (state "draining": no new requests), within one health interval;
- the workers' requests in flight to it are read from the metrics files they already
  share (prometheus multiprocess, `tiergate_requests_in_flight`, summed over workers);
  the parent waits until they are 0 or the drain time is over;
- its supervisor then stops and starts the engine (streams still open end with the
  error event and [DONE], as in one process), and the flag is removed once it is
  ready again, so the workers' health polls put it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.config import Settings

if TYPE_CHECKING:
    from serving.engines.supervisor import EngineRunner, Supervisor

log = logging.getLogger("tiergate.workers")

IN_FLIGHT = "tiergate_requests_in_flight"


def workers_in_flight(metrics_dir: Path, engine: str) -> float:
    """The requests in flight to `engine`, summed over the workers' metrics files."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == IN_FLIGHT
        for sample in family.samples
        if sample.labels.get("engine") == engine
    )


class ParentControl:
    """The parent's end: restarts asked for by the workers, one engine at a time."""

    def __init__(self, settings: Settings, supervisor: Supervisor, work: Path) -> None:
        self.settings = settings
        self.supervisor = supervisor
        self.socket = work / "control.sock"
        self.flags = work / "draining"
        self.metrics = work / "metrics"
        self.flags.mkdir(exist_ok=True)
        self.lock = asyncio.Lock()
        self.restarting: set[str] = set()  # asked for and not answered yet
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=str(self.socket))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            ask = json.loads(await reader.readline())
            answer = await self.restart(str(ask["engine"]), float(ask["drain"]))
        except (ValueError, KeyError, TypeError) as exc:
            answer = {"status": 400, "message": f"Bad request to the parent: {exc}"}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    async def restart(self, name: str, drain: float) -> dict[str, Any]:
        try:
            runner = self.supervisor.runner(name)
        except KeyError:
            return {"status": 404, "message": f"No engine named '{name}' is started here."}
        # Its state stays "ready" here while the workers drain it: ask the set as well,
        # so that a second ask answers 409 as in one process instead of queueing.
        state = "draining" if name in self.restarting else runner.endpoint.state
        if state != "ready":
            return {"status": 409, "message": f"Cannot restart it now: it is {state}."}
        self.restarting.add(name)
        try:
            return await self._restart(name, runner, drain)
        finally:
            self.restarting.discard(name)

    async def _restart(self, name: str, runner: EngineRunner, drain: float) -> dict[str, Any]:
        async with self.lock:
            flag = self.flags / name
            started = time.monotonic()
            flag.touch()
            try:
                # every worker's health poll sees the flag within one interval
                await asyncio.sleep(self.settings.timeouts.health_interval + 0.5)
                deadline = started + drain
                while time.monotonic() < deadline:
                    left = await asyncio.to_thread(workers_in_flight, self.metrics, name)
                    if left <= 0:
                        break
                    await asyncio.sleep(0.1)
                log.info("engine %s: drained across the workers, restarting", name)
                back = await runner.replace(0.0, self.settings.timeouts.engine_start)
            except RuntimeError as exc:
                return {"status": 409, "message": f"Cannot restart it now: {exc}."}
            finally:
                flag.unlink(missing_ok=True)
        if not back:
            return {
                "status": 409,
                "message": f"Engine '{name}' did not come back within timeouts.engine_start.",
            }
        # Answer once every worker's health poll has seen it back (as the drain waits for
        # them to see the flag): "ready" then holds on whichever worker a client reaches.
        await asyncio.sleep(self.settings.timeouts.health_interval + 0.5)
        return {"status": 200, **runner.restarted(started)}


async def ask_parent(socket: Path, name: str, drain: float, timeout: float) -> dict[str, Any]:
    """A worker's end: the parent's answer to one restart (its "status" is HTTP's)."""
    reader, writer = await asyncio.open_unix_connection(str(socket))
    try:
        writer.write(json.dumps({"engine": name, "drain": drain}).encode() + b"\n")
        await writer.drain()
        return json.loads(await asyncio.wait_for(reader.readline(), timeout))
    finally:
        writer.close()
