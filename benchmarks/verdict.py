"""Can this run be trusted? Pass, or warn with reasons. Pure rules over a run's facts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Thresholds:
    send_lag_p99_ms: float = 25.0  # requests left later than scheduled by the client
    loop_lag_p99_ms: float = 25.0  # the client's event loop was late waking up
    client_cpu_share: float = 0.9  # of one core, by the client process
    dispatch_ratio: float = 0.95  # open loop: requests sent / requests due
    steady_min_ratio: float = 0.5  # slowest slice / fastest slice of the window
    ttft_growth: float = 2.0  # last quarter's median TTFT / first quarter's
    min_tail_samples: int = 5  # samples beyond a percentile needed to quote it
    max_error_rate: float = 0.01
    max_cache_hit_rate: float = 0.1  # when the dataset should not hit the prefix cache


@dataclass
class RunFacts:
    """What the runner observed, beyond the summary."""

    loop_lag_p99_ms: float = 0.0
    client_cpu_share: float = 0.0
    due: int = 0
    sent_on_time: int = 0  # open loop: sent by the time the schedule ended
    bucket_tok_s: list[float] = field(default_factory=list)
    ttft_first_quarter_ms: float | None = None
    ttft_last_quarter_ms: float | None = None
    cache_hit_rate: float | None = None  # None: the server did not say
    expect_cache_hits: bool = False
    open_loop: bool = False


def judge(summary: dict, facts: RunFacts, quoted: tuple[float, ...], t: Thresholds) -> dict:
    reasons: list[str] = []
    lag = summary["send_lag_ms"].get("p99")
    if lag is not None and lag > t.send_lag_p99_ms:
        reasons.append(
            f"client saturated: p99 send lag {lag:.1f} ms > {t.send_lag_p99_ms:g} ms "
            "(requests left later than scheduled)"
        )
    if facts.loop_lag_p99_ms > t.loop_lag_p99_ms:
        reasons.append(
            f"client saturated: event-loop lag p99 {facts.loop_lag_p99_ms:.1f} ms "
            f"> {t.loop_lag_p99_ms:g} ms"
        )
    if facts.client_cpu_share > t.client_cpu_share:
        reasons.append(
            f"client saturated: it used {facts.client_cpu_share:.0%} of a core "
            f"(> {t.client_cpu_share:.0%})"
        )
    if facts.open_loop and facts.due and facts.sent_on_time / facts.due < t.dispatch_ratio:
        reasons.append(
            f"client saturated: sent {facts.sent_on_time} of {facts.due} requests by the "
            "end of the schedule"
        )
    buckets = [b for b in facts.bucket_tok_s if b is not None]
    if len(buckets) >= 2 and max(buckets) > 0 and min(buckets) / max(buckets) < t.steady_min_ratio:
        reasons.append(
            "never reached a steady state: output tok/s across the window ranged "
            f"{min(buckets):.1f}..{max(buckets):.1f}"
        )
    first, last = facts.ttft_first_quarter_ms, facts.ttft_last_quarter_ms
    if first and last and last > t.ttft_growth * first and last - first > 250:
        reasons.append(
            f"never reached a steady state: median TTFT grew from {first:.0f} ms to "
            f"{last:.0f} ms over the run (a queue is building: the load is past capacity)"
        )
    n = summary["ttft_ms"].get("n") or 0
    thin = [p for p in quoted if n * (1 - p / 100) < t.min_tail_samples]
    if thin:
        needs = ", ".join(
            f"p{p:g} needs {math.ceil(t.min_tail_samples / (1 - p / 100))}" for p in thin
        )
        reasons.append(f"too few samples: {n} completed requests; {needs}")
    if summary["requests"] == 0:
        reasons.append("no requests fell inside the measurement window")
    if summary["error_rate"] > t.max_error_rate:
        reasons.append(
            f"errors: {summary['error_rate']:.1%} of requests failed "
            f"(> {t.max_error_rate:.0%}): {summary['errors']}"
        )
    hits = facts.cache_hit_rate
    if hits is not None and not facts.expect_cache_hits and hits > t.max_cache_hit_rate:
        reasons.append(
            f"unexpected cache hits: {hits:.0%} of prompt tokens came from the prefix cache "
            "(prompts repeat, or the server was warm with them)"
        )
    return {"status": "warn" if reasons else "pass", "reasons": reasons}
