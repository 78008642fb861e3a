"""uvicorn's Server with a main loop that sleeps until there is something to do.

uvicorn's own main loop wakes ten times a second to look at `should_exit`. On the hosts
measured here a wake-up of an idle event loop costs ~0.2 ms of CPU, so those ticks
were half of an idle gateway's CPU (3.7 -> 1.8 ms/s without them, benchmarks/RESULTS.md).
Here the loop wakes once a second (the Date header's resolution) or at once when
`should_exit` is set, by a signal handler or by our own code.
"""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn


class GatewayServer(uvicorn.Server):
    tick_s = 1.0  # the longest sleep between ticks

    def __init__(self, config: uvicorn.Config) -> None:
        self._nudge: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exit = False
        super().__init__(config)

    @property
    def should_exit(self) -> bool:
        return self._exit

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        self._exit = value
        if value and self._loop is not None and self._nudge is not None:
            # Thread-safe form: uvicorn sets this from a signal handler.
            with contextlib.suppress(RuntimeError):  # the loop already closed
                self._loop.call_soon_threadsafe(self._nudge.set)

    async def main_loop(self) -> None:
        self._loop, self._nudge = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        # on_tick refreshes the Date header when counter % 10 == 0: every call here.
        while not await self.on_tick(counter):
            counter = (counter + 10) % 864000
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._nudge.wait()
