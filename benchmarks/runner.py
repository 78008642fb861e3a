"""Drive load: closed loop (fixed concurrency) or open loop (an arrival process).

The runner records timelines only; `metrics` and `verdict` judge them afterwards.
It also watches itself (event-loop lag, CPU use, how late requests left) so that a
run where the client was the bottleneck says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import aiohttp

from benchmarks.arrivals import arrival_offsets
from benchmarks.client import Target, send
from benchmarks.datasets import RequestSpec, Session
from benchmarks.metrics import RequestRecord


@dataclass(frozen=True)
class Load:
    """One load point. `kind` is "concurrency" (closed loop) or "rate" (open loop, req/s)."""

    kind: str
    value: float
    duration: float | None = None  # seconds of scheduling; None: run `count` sessions
    count: int | None = None
    warmup: float = 0.0  # seconds at the start left out of the measurement
    cooldown: float = 0.0  # seconds at the end of the schedule left out
    burstiness: float = 1.0
    seed: int = 0
    # closed loop: sessions open at once (at least one per client). A free client takes
    # the next turn of one of the waiting sessions, drawn at random (users come back in
    # no fixed order; a fixed cycle would let round robin keep each conversation on one
    # engine by parity), so each has a think time and the engines hold `live` of them.
    live: int = 0
    # open loop: mean seconds a user thinks between an answer and their next turn
    # (exponential, drawn per session from `seed`); 0: the next turn goes at once.
    think: float = 0.0

    @property
    def label(self) -> str:
        return f"C={self.value:g}" if self.kind == "concurrency" else f"{self.value:g} req/s"


@dataclass
class RunResult:
    load: Load
    records: list[RequestRecord]
    wall: float
    schedule_end: float  # when the last request was due (closed loop: when sending stopped)
    loop_lag_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0
    due: int = 0
    sent_on_time: int = 0
    ran_out: bool = False  # the dataset ended before the duration did

    @property
    def window(self) -> tuple[float, float]:
        end = (
            self.schedule_end
            if self.load.duration
            else max((r.end for r in self.records), default=0.0)
        )
        return self.load.warmup, max(self.load.warmup, end - self.load.cooldown)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """A full collection over thousands of records would stall the schedule mid-run."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _LagMonitor:
    """How late the event loop wakes from a 10 ms sleep: high when the client is busy."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task | None = None

    async def _run(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            self.samples.append((time.perf_counter() - start - 0.01) * 1000)

    def __enter__(self) -> _LagMonitor:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()


async def run(
    target: Target,
    sessions: Iterator[Session],
    load: Load,
    on_done: Callable[[RequestRecord], None] | None = None,
) -> RunResult:
    """Run one load point. Turns of a session go one after another. Open loop: a turn
    is scheduled when the previous one ended, plus a think time (`load.think`). Closed
    loop: when a client takes it, from one of the `load.live` open sessions that wait,
    drawn at random."""
    offsets: list[float] = []
    if load.kind == "rate":
        offsets = arrival_offsets(
            load.value,
            count=load.count,
            duration=load.duration,
            burstiness=load.burstiness,
            seed=load.seed,
        )
    ran_out = False
    if load.count or offsets:  # a known number: draw and encode it all before the clock starts
        want = len(offsets) if offsets else load.count
        drawn = list(itertools.islice(sessions, want))
        for spec in (spec for session in drawn for spec in session):
            spec.body = target.encode(spec)
        if offsets and len(drawn) < len(offsets):
            offsets, ran_out = offsets[: len(drawn)], True
        sessions = iter(drawn)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=target.timeout_s, sock_connect=10)
    records: list[RequestRecord] = []
    with _gc_paused():
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        result = RunResult(load=load, records=records, wall=0.0, schedule_end=0.0, ran_out=ran_out)

        def now() -> float:
            return time.perf_counter() - t0

        def past_deadline() -> bool:
            return load.duration is not None and now() >= load.duration

        async def one_turn(
            http: aiohttp.ClientSession, spec: RequestSpec, due: float
        ) -> RequestRecord:
            record = RequestRecord(
                index=len(records),
                scheduled=due,
                expected_input=spec.input_tokens,
                expected_output=spec.output_tokens,
                session=spec.session,
                turn=spec.turn,
            )
            records.append(record)
            await send(http, target, spec, record, t0)
            if on_done:
                on_done(record)
            return record

        async def run_session(
            http: aiohttp.ClientSession, session: Session, due: float, k: int
        ) -> None:
            # a draw per session, not per answer: the same seed thinks the same however
            # the answers interleave
            thinks = random.Random(load.seed * 1_000_003 + k) if load.think else None
            for spec in session:
                if (wait := due - now()) > 0:
                    await asyncio.sleep(wait)
                record = await one_turn(http, spec, due)
                if not record.ok:
                    return  # later turns would carry a history the server never answered
                due = record.end + (thinks.expovariate(1 / load.think) if thinks else 0.0)

        # closed loop: open sessions, each with the index of its next turn
        waiting: list[tuple[Session, int]] = []
        pick = random.Random(load.seed)
        live = max(load.live, int(load.value)) if load.kind == "concurrency" else 0
        opened = 0

        async def worker(http: aiohttp.ClientSession) -> None:
            nonlocal opened
            while not past_deadline():
                while opened < live:  # off the clock: due starts when the turn is taken
                    session = next(sessions, None)
                    if session is None:
                        result.ran_out = load.duration is not None
                        break
                    if session:
                        waiting.append((session, 0))
                        opened += 1
                if not waiting:
                    return  # the rest are in flight with other clients
                j = pick.randrange(len(waiting))
                waiting[j], waiting[-1] = waiting[-1], waiting[j]
                session, i = waiting.pop()
                record = await one_turn(http, session[i], now())
                if record.ok and i + 1 < len(session):
                    waiting.append((session, i + 1))
                else:  # done, or later turns would carry a history never answered
                    opened -= 1

        async with aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),  # nothing to keep; saves work per request
        ) as http:
            with _LagMonitor() as lag:
                if load.kind == "concurrency":
                    await asyncio.gather(*(worker(http) for _ in range(int(load.value))))
                    result.schedule_end = load.duration or now()
                else:
                    tasks = []
                    for k, (session, due) in enumerate(zip(sessions, offsets, strict=False)):
                        delay = due - now()
                        if delay > 0:
                            await asyncio.sleep(delay)
                        tasks.append(asyncio.create_task(run_session(http, session, due, k)))
                    result.due = len(offsets)
                    result.schedule_end = load.duration or (offsets[-1] if offsets else 0.0)
                    await asyncio.sleep(0)  # let the last tasks send
                    result.sent_on_time = sum(
                        1 for r in records if r.turn == 0 and r.sent <= result.schedule_end + 0.01
                    )
                    await asyncio.gather(*tasks)
                result.loop_lag_ms = lag.samples
        result.wall = now()
        result.client_cpu_s = time.process_time() - cpu0
        return result
