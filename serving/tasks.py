"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task], recancel_s: float = 1.0) -> None:
    """Cancel `tasks` and return once all are done.

    A cancellation can be lost: on Python 3.11, `asyncio.wait_for` (dnspython's lookups
    use it) drops a cancel that lands just as its inner future completes (CPython
    gh-86296), and the task then runs on. Waiting on such a task with gather hangs the
    shutdown for ever, so any task still running after `recancel_s` is cancelled again.
    """
    tasks = list(tasks)
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=recancel_s)
    for task in tasks:  # retrieved, as gather(return_exceptions=True) would: no warning
        if not task.cancelled():
            task.exception()
