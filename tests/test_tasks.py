"""Background tasks stop even when a cancellation is lost (the cause of a shutdown that
hung for 600 s in CI: dnspython's asyncio.wait_for dropped the lifespan's cancel)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from serving.tasks import cancel_and_wait

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_task_that_swallows_its_first_cancel_is_stopped() -> None:
    rounds = 0

    async def loop_that_loses_one_cancel() -> None:
        nonlocal rounds
        lost = False
        while True:
            rounds += 1
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if lost:
                    raise
                lost = True  # what wait_for does on 3.11 when the result lands at once

    task = asyncio.create_task(loop_that_loses_one_cancel())
    await asyncio.sleep(0.05)
    # one cancel and a wait (what gather does) would wait for ever here
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=0.3)
    assert not done
    await asyncio.wait_for(cancel_and_wait([task], recancel_s=0.05), 5)
    assert task.cancelled() and rounds > 1


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for was rewritten in 3.12")
async def test_the_real_wait_for_race_is_survived() -> None:
    """A cancel that lands when wait_for's inner future is already done is lost on 3.11."""

    async def poll() -> None:
        while True:
            ready = asyncio.get_running_loop().create_future()
            ready.set_result(None)
            await asyncio.wait_for(ready, 1.0)  # completes at once: the racy window
            await asyncio.sleep(0)

    losses = 0
    for _ in range(20):
        task = asyncio.create_task(poll())
        await asyncio.sleep(0)
        await cancel_and_wait([task], recancel_s=0.05)
        assert task.done()
        losses += task.cancelling() > 1  # it took more than one cancel
    assert losses > 0  # the premise: on 3.11 one cancel is not enough


async def test_exceptions_are_retrieved_and_done_tasks_are_fine() -> None:
    async def boom() -> None:
        raise RuntimeError("x")

    failed = asyncio.create_task(boom())
    await asyncio.sleep(0)
    await cancel_and_wait([failed])
    assert isinstance(failed.exception(), RuntimeError)


async def test_terminate_waits_until_the_whole_engine_group_is_gone() -> None:
    """An engine's children (vLLM's core and workers) die with it, and terminate returns
    only once none is left: a worker still tearing down must not outlive the gateway."""
    from serving.engines.process import group_members, terminate

    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", "trap '' TERM; sleep 30 & sleep 30 & wait",
        start_new_session=True,
    )  # fmt: skip
    for _ in range(100):
        if len(group_members(proc.pid)) == 3:  # the shell and its two children
            break
        await asyncio.sleep(0.02)
    assert len(group_members(proc.pid)) == 3
    await terminate(proc, grace=0.3)  # the shell ignores SIGTERM: SIGKILL after 0.3 s
    assert group_members(proc.pid) == []
