"""Capacity-plan arithmetic over a bench sweep. Pure functions of the sweep's summaries."""

from __future__ import annotations

import math
from dataclasses import dataclass

HOURS_PER_MONTH = 730


@dataclass(frozen=True)
class Limit:
    """The SLO limit a sweep found: the last load point that passed and the first that failed."""

    last_pass: dict | None  # the point (load, summary, verdict), None: even the lightest failed
    first_fail: dict | None  # None: the sweep never reached the limit
    goodput_target: float

    @property
    def per_replica_req_s(self) -> float:
        return self.last_pass["summary"]["req_s"] if self.last_pass else 0.0

    @property
    def per_replica_output_tok_s(self) -> float:
        return self.last_pass["summary"]["output_tok_s"] if self.last_pass else 0.0


def passes(point: dict, goodput_target: float, require_valid: bool) -> bool:
    ok = point["summary"]["goodput_share"] >= goodput_target
    return ok and (not require_valid or point["verdict"]["status"] == "pass")


def find_limit(points: list[dict], goodput_target: float, require_valid: bool = False) -> Limit:
    """Walk the sweep in order of load; the limit is where it first stops passing."""
    ordered = sorted(points, key=lambda p: p["load"]["value"])
    last = None
    for point in ordered:
        if not passes(point, goodput_target, require_valid):
            return Limit(last, point, goodput_target)
        last = point
    return Limit(last, None, goodput_target)


def mix_factor(bench_output_tokens: float, traffic_output_tokens: float | None) -> float:
    """Scale a replica's req/s from the benchmarked mix to the traffic's. Decode time
    dominates, so capacity in requests scales inversely with output length."""
    if not traffic_output_tokens or not bench_output_tokens:
        return 1.0
    return bench_output_tokens / traffic_output_tokens


def replicas_needed(peak_req_s: float, per_replica_req_s: float, headroom: float) -> int:
    """Replicas so that peak traffic uses at most (1 - headroom) of each."""
    if not 0 <= headroom < 1:
        raise ValueError("headroom must be in [0, 1)")
    if per_replica_req_s <= 0:
        raise ValueError("a replica sustains no load under this SLO")
    return max(1, math.ceil(peak_req_s / (per_replica_req_s * (1 - headroom)) - 1e-9))


@dataclass(frozen=True)
class Cost:
    usd_per_hour: float  # the whole fleet
    usd_per_month: float
    usd_per_1m_output_tokens: float  # at the peak traffic, fleet as planned
    usd_per_1k_requests: float
    usd_per_1m_output_tokens_at_limit: float  # one replica run at its SLO limit


def cost(
    usd_per_gpu_hour: float,
    gpus_per_replica: int,
    replicas: int,
    peak_req_s: float,
    output_tokens_per_request: float,
    limit_output_tok_s: float,
) -> Cost:
    fleet = usd_per_gpu_hour * gpus_per_replica * replicas
    tokens_per_hour = peak_req_s * output_tokens_per_request * 3600
    replica_hour = usd_per_gpu_hour * gpus_per_replica
    return Cost(
        usd_per_hour=fleet,
        usd_per_month=fleet * HOURS_PER_MONTH,
        usd_per_1m_output_tokens=fleet / tokens_per_hour * 1e6 if tokens_per_hour else math.inf,
        usd_per_1k_requests=fleet / (peak_req_s * 3600) * 1e3 if peak_req_s else math.inf,
        usd_per_1m_output_tokens_at_limit=(
            replica_hour / (limit_output_tok_s * 3600) * 1e6 if limit_output_tok_s else math.inf
        ),
    )
