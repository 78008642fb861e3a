"""A finite burst through continuous batching: a small discrete-event simulation.

The steady-state roofline (benchmarks/roofline.py) assumes every request has the mean
lengths and the batch stays full. A burst of real requests does neither: answers are
heavy-tailed, so the batch drains to a few long answers at the end, and the run lasts
as long as its longest one. This simulates the engine step by step, the way vLLM's V1
scheduler fills a step:
- running requests first, each one token (decode) or a chunk of its prompt (chunked
  prefill), then waiting ones in arrival order, within `max_num_batched_tokens` and
  `max_num_seqs`;
- K/V in blocks of `block_size`; when a running request needs a block and none is
  free, the latest admitted one is preempted and recomputed later, as vLLM does;
- each step costs the roofline's step time for the tokens it computes and the K/V it
  reads (Roofline.step), so the efficiency factors are the model's, not refitted.
Stretches where every running request is decoding and nothing can be admitted are
advanced in one go, up to the next finish, arrival or block boundary.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass, field

from benchmarks.roofline import Roofline


@dataclass(frozen=True)
class EngineLimits:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_tokens: int = 10**9  # the memory planner's KV capacity
    block_size: int = 16


@dataclass
class _Seq:
    index: int
    arrival: float
    prompt: int
    output: int
    target: int = (
        0  # tokens to compute before the next token comes: the prompt, or more after preemption
    )
    computed: int = 0  # tokens with K/V in the cache
    generated: int = 0
    blocks: int = 0
    first_token: float | None = None
    finished: float | None = None

    def __post_init__(self) -> None:
        self.target = self.prompt


@dataclass
class BurstResult:
    requests: int
    duration_s: float  # first arrival to last finish
    req_s: float
    output_tok_s: float
    ttft_s: list[float]
    tpot_s: list[float]
    steps: int
    preemptions: int
    peak_running: int
    notes: list[str] = field(default_factory=list)

    def ttft_p(self, q: float) -> float:
        return _quantile(self.ttft_s, q)

    def tpot_p(self, q: float) -> float:
        return _quantile(self.tpot_s, q)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(
    model: Roofline,
    requests: list[tuple[int, int]],
    limits: EngineLimits = EngineLimits(),
    arrivals: list[float] | None = None,
    stretch: bool = True,
) -> BurstResult:
    """Run `requests` ((prompt, output) tokens) through one engine; all arrive at 0
    unless `arrivals` gives each one's time. `stretch=False` steps one at a time (the
    same result, slower: it checks the shortcut)."""
    if not requests:
        raise ValueError("no requests to simulate")
    times = arrivals or [0.0] * len(requests)
    seqs = [_Seq(i, times[i], p, max(1, o)) for i, (p, o) in enumerate(requests)]
    bs = limits.block_size
    total_blocks = limits.kv_tokens // bs
    for s in seqs:
        if -(-(s.prompt + s.output) // bs) > total_blocks:
            raise ValueError(
                f"a request of {s.prompt}+{s.output} tokens does not fit the KV cache "
                f"({limits.kv_tokens} tokens)"
            )
    waiting = deque(sorted(seqs, key=lambda s: s.arrival))
    running: list[_Seq] = []
    free = total_blocks
    t = min(times)
    steps = preemptions = peak = 0

    def grow(s: _Seq, tokens: int) -> bool:
        nonlocal free
        need = -(-(s.computed + tokens) // bs) - s.blocks
        if need > free:
            return False
        free -= need
        s.blocks += need
        return True

    def release(s: _Seq) -> None:
        nonlocal free
        free += s.blocks
        s.blocks = 0

    while waiting or running:
        if not running and waiting[0].arrival > t:
            t = waiting[0].arrival
        if (
            stretch
            and running
            and _all_decoding(running)
            and not _admissible(waiting, running, t, limits)
        ):
            k = _decode_run(model, running, waiting, t, limits, free, bs)
            if k > 1:
                t += _decode_time(model, running, k)
                steps += k
                for s in running:
                    s.computed += k
                    s.generated += k
                    s.blocks = -(-s.computed // bs)
                free = total_blocks - sum(s.blocks for s in running)
                running = _finish(running, t, release)
                continue
        budget = limits.max_num_batched_tokens
        batch: list[tuple[_Seq, int]] = []
        preempted: set[int] = set()
        for s in list(running):
            if s.index in preempted:
                continue  # preempted earlier in this step
            want = s.target - s.computed if s.computed < s.target else 1
            n = min(want, budget)
            if n <= 0:
                break
            while not grow(s, n):
                victim = running.pop()  # the latest admitted goes back to the queue
                release(victim)
                victim.target = victim.prompt + victim.generated
                victim.computed = 0
                waiting.appendleft(victim)
                preemptions += 1
                preempted.add(victim.index)
                if victim is s:
                    break
            if s.index not in preempted:
                batch.append((s, n))
                budget -= n
        while (
            not preempted
            and waiting
            and waiting[0].arrival <= t
            and len(running) < limits.max_num_seqs
            and budget > 0
        ):
            s = waiting[0]
            n = min(s.target - s.computed, budget)
            if not grow(s, n):
                break
            waiting.popleft()
            running.append(s)
            batch.append((s, n))
            budget -= n
        if not batch:
            if not running and waiting:
                t = max(t, waiting[0].arrival)
                continue
            raise RuntimeError("the simulated engine is stuck")  # a bug, not an input
        peak = max(peak, len(running))
        tokens = sum(n for _, n in batch)
        kv = sum(s.computed + n for s, n in batch)
        attention = sum(n * s.computed + n * (n + 1) / 2 for s, n in batch)
        t += model.step(tokens, kv, attention)
        steps += 1
        for s, n in batch:
            s.computed += n
            if s.computed >= s.target:  # this step samples a token
                s.generated += 1
                if s.first_token is None:
                    s.first_token = t
        running = _finish(running, t, release)

    end = max(s.finished or 0.0 for s in seqs)
    start = min(times)
    duration = max(end - start, 1e-9)
    out = sum(s.output for s in seqs)
    return BurstResult(
        requests=len(seqs),
        duration_s=duration,
        req_s=len(seqs) / duration,
        output_tok_s=out / duration,
        ttft_s=[s.first_token - s.arrival for s in seqs if s.first_token is not None],
        tpot_s=[
            (s.finished - s.first_token) / (s.output - 1)
            for s in seqs
            if s.output > 1 and s.finished is not None and s.first_token is not None
        ],
        steps=steps,
        preemptions=preemptions,
        peak_running=peak,
    )


def _all_decoding(running: list[_Seq]) -> bool:
    return all(s.computed >= s.target for s in running)


def _admissible(waiting: deque[_Seq], running: list[_Seq], t: float, lim: EngineLimits) -> bool:
    return bool(waiting) and waiting[0].arrival <= t and len(running) < lim.max_num_seqs


def _decode_run(
    model: Roofline,
    running: list[_Seq],
    waiting: deque[_Seq],
    t: float,
    lim: EngineLimits,
    free: int,
    bs: int,
) -> int:
    """How many pure-decode steps can go in one stretch: up to the first finish, to
    the next arrival that could be admitted, and no further than the free blocks allow
    (a block boundary that needs preemption is then stepped singly)."""
    k = min(s.output - s.generated for s in running)
    if waiting and len(running) < lim.max_num_seqs:
        n = len(running)
        first = model.step(n, sum(s.computed for s in running) + n)
        k = min(k, max(1, math.ceil((waiting[0].arrival - t) / first)))
    need = sum(-(-(s.computed + k) // bs) - s.blocks for s in running)
    return 1 if need > free else k


def _decode_time(model: Roofline, running: list[_Seq], k: int) -> float:
    """Time of k decode steps: each reads one more token of K/V per request."""
    n = len(running)
    base = sum(s.computed for s in running)
    total = 0.0
    for j in range(k):
        kv = base + n * (j + 1)
        total += model.step(n, kv, kv)
    return total


def _finish(running: list[_Seq], t: float, release) -> list[_Seq]:
    still = []
    for s in running:
        if s.generated >= s.output:
            s.finished = t
            release(s)
        else:
            still.append(s)
    return still


def summarize(results: list[BurstResult]) -> dict[str, float]:
    """Medians (and the spread of req/s) over several sampled bursts."""
    rates = sorted(r.req_s for r in results)
    return {
        "req_s": statistics.median(rates),
        "req_s_p10": rates[int(0.1 * (len(rates) - 1))],
        "req_s_p90": rates[int(0.9 * (len(rates) - 1))],
        "output_tok_s": statistics.median(r.output_tok_s for r in results),
        "duration_s": statistics.median(r.duration_s for r in results),
        "ttft_p50_s": statistics.median(r.ttft_p(0.5) for r in results),
        "tpot_p50_s": statistics.median(r.tpot_p(0.5) for r in results),
    }
