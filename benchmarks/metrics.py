"""Per-request latencies and run summaries, from recorded timelines. Pure functions.

Every time is in seconds from the run's start. Latency counts from when a request
was *scheduled*, not from when the client got round to sending it, so a lagging
client cannot hide tail latency.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

DEFAULT_PERCENTILES = (50.0, 90.0, 95.0, 99.0)


@dataclass
class RequestRecord:
    index: int
    scheduled: float
    sent: float = math.nan
    end: float = math.nan
    chunk_times: list[float] = field(default_factory=list)  # events that carried output
    prompt_tokens: int | None = None  # from the server's usage
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    expected_input: int = 0
    expected_output: int = 0
    session: str | None = None
    turn: int = 0
    status: int | None = None
    error_kind: str | None = None  # http_4xx, http_5xx, timeout, connection, stream, no_usage
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.scheduled if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.scheduled

    @property
    def send_lag(self) -> float:
        return self.sent - self.scheduled

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        n = self.completion_tokens or 0
        if not self.chunk_times or n < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (n - 1)

    def itl(self) -> list[float]:
        """Gaps between token events. Only when chunks clearly carry several tokens each
        (e.g. speculative decoding) is each gap spread over the tokens it brought."""
        times = self.chunk_times
        if len(times) < 2:
            return []
        gaps = [b - a for a, b in itertools.pairwise(times)]
        per_chunk = ((self.completion_tokens or len(times)) - 1) / (len(times) - 1)
        if per_chunk < 1.5:
            return gaps
        reps = round(per_chunk)
        return [g / per_chunk for g in gaps for _ in range(reps)]

    def tokens_in(self, t0: float, t1: float) -> float:
        """Output tokens produced in [t0, t1], each chunk worth an equal share of usage."""
        if not self.chunk_times or not self.completion_tokens:
            return 0.0
        per_chunk = self.completion_tokens / len(self.chunk_times)
        return per_chunk * sum(t0 <= t <= t1 for t in self.chunk_times)


@dataclass(frozen=True)
class SLO:
    """Limits a request must meet to count towards goodput (seconds; None = no limit)."""

    ttft: float | None = None
    tpot: float | None = None
    e2e: float | None = None

    def met(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        if self.ttft is not None and (r.ttft is None or r.ttft > self.ttft):
            return False
        if self.tpot is not None and r.tpot is not None and r.tpot > self.tpot:
            return False
        return self.e2e is None or r.e2e <= self.e2e

    def describe(self) -> str:
        parts = [
            f"{name} <= {limit * 1000:g} ms"
            for name, limit in (("TTFT", self.ttft), ("TPOT", self.tpot), ("E2E", self.e2e))
            if limit is not None
        ]
        return ", ".join(parts) or "none"


def percentiles(values: list[float], ps: tuple[float, ...]) -> dict[str, float | None]:
    """`p50` etc. by linear interpolation (numpy's default); None when there is no data."""
    if not values:
        return {f"p{p:g}": None for p in ps} | {"mean": None, "n": 0}
    arr = np.asarray(values, dtype=float)
    out: dict[str, float | None] = {
        f"p{p:g}": float(v) for p, v in zip(ps, np.percentile(arr, ps), strict=True)
    }
    out["mean"] = float(arr.mean())
    out["n"] = len(values)
    return out


def _ms(stats: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (v * 1000 if v is not None and k != "n" else v) for k, v in stats.items()}


def measured(records: list[RequestRecord], t0: float, t1: float) -> list[RequestRecord]:
    """Requests scheduled inside the measurement window: warm-up and cool-down left out."""
    return [r for r in records if t0 <= r.scheduled <= t1]


def summarize(
    records: list[RequestRecord],
    t0: float,
    t1: float,
    *,
    slo: SLO = SLO(),
    ps: tuple[float, ...] = DEFAULT_PERCENTILES,
) -> dict:
    """Latency percentiles (ms), throughput and goodput over the window [t0, t1].

    Throughput counts the tokens produced inside the window, whichever request they
    belong to, so a run's ramp-up and drain do not dilute it.
    """
    span = max(t1 - t0, 1e-9)
    mine = measured(records, t0, t1)
    ok = [r for r in mine if r.ok]
    out_tokens = sum(r.tokens_in(t0, t1) for r in records)
    prefill_tokens = sum(
        r.prompt_tokens or 0 for r in records if r.chunk_times and t0 <= r.chunk_times[0] <= t1
    )
    done = sum(1 for r in records if r.ok and t0 <= r.end <= t1)
    good = sum(slo.met(r) for r in mine)
    itl = [g for r in ok for g in r.itl()]
    return {
        "window_s": span,
        "requests": len(mine),
        "completed": len(ok),
        "errors": dict(Counter(r.error_kind for r in mine if not r.ok)),
        "error_rate": (len(mine) - len(ok)) / len(mine) if mine else 0.0,
        "ttft_ms": _ms(percentiles([r.ttft for r in ok if r.ttft is not None], ps)),
        "tpot_ms": _ms(percentiles([r.tpot for r in ok if r.tpot is not None], ps)),
        "itl_ms": _ms(percentiles(itl, ps)),
        "e2e_ms": _ms(percentiles([r.e2e for r in ok], ps)),
        "send_lag_ms": _ms(percentiles([r.send_lag for r in mine if not math.isnan(r.sent)], ps)),
        "output_tok_s": out_tokens / span,
        "total_tok_s": (out_tokens + prefill_tokens) / span,
        "req_s": done / span,
        "mean_input_tokens": _mean([r.prompt_tokens for r in ok if r.prompt_tokens]),
        "mean_output_tokens": _mean([r.completion_tokens for r in ok if r.completion_tokens]),
        "slo": slo.describe(),
        "goodput_share": good / len(mine) if mine else 0.0,
        "goodput_req_s": good / span,
    }


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def bucket_throughput(records: list[RequestRecord], t0: float, t1: float, buckets: int) -> list:
    """Output tok/s in equal slices of the window, to see whether the run was steady."""
    width = (t1 - t0) / buckets
    return [
        sum(r.tokens_in(t0 + i * width, t0 + (i + 1) * width) for r in records) / width
        for i in range(buckets)
    ]
