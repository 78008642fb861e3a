"""Replica order within a tier: one cost, in prompt tokens, that blends cache reuse with
load. Pure.

    cost(r) = queued(r) - min(matched(r) + session(r), max_credit) + load_tokens * load(r)

- queued(r): prompt tokens sent to r that it has yet to compute (requests routed there
  whose first token has not come back, less what they found cached): the prefill work
  ahead of this request, which is what its time to first token waits on.
- matched(r): prompt tokens r holds in its prefix cache (serving/router/prefix.py), in
  absolute tokens: a 900-token hit saves 900 tokens of prefill, a share would not say.
  (The prompt's own uncached rest, prompt - matched, is the same sum on every replica
  once matched is subtracted, so it is left out.)
- session(r): `session_tokens` when r is where this session (x-session-id or `user`)
  went last, else 0: a strong preference, not a fixed home.
- load(r): serving/router/load.py's load_score: the requests this gateway has on r now,
  plus the others r reported at its last scrape: the decoding every step also carries.
- load_tokens (W): prompt tokens of prefill that one more request of load is worth.
- max_credit: the most reuse can buy. A hot prefix cached on one replica moves on once
  that replica holds max_credit / W more requests (or max_credit more queued tokens)
  than another, so one prompt shared by all traffic cannot pile on one engine.

The lowest cost goes first; ties go to the less loaded, then round the replicas by
`turn`. Saturated and unavailable replicas are left out (serving/router/planner.py spills).
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.router.load import EngineLoad, load_score, saturated


@dataclass(frozen=True)
class ReplicaView:
    name: str
    load: EngineLoad
    in_flight: int
    available: bool  # ready and its breaker lets a request through
    matched: int = 0  # prompt tokens it has cached
    home: bool = False  # where this request's session went last
    queued: int = 0  # prompt tokens sent there and not computed yet
    others: float = 0.0  # requests on it from elsewhere, as last scraped


@dataclass(frozen=True)
class Limits:
    max_waiting: float
    max_kv_usage: float
    max_in_flight: int


@dataclass(frozen=True)
class Weights:
    load_tokens: float = 64.0
    max_credit: int = 512
    session_tokens: int = 512


def is_saturated(r: ReplicaView, limits: Limits) -> bool:
    return saturated(
        r.load, r.in_flight, limits.max_waiting, limits.max_kv_usage, limits.max_in_flight
    )


def credit(r: ReplicaView, w: Weights) -> float:
    return min(r.matched + (w.session_tokens if r.home else 0), w.max_credit)


def rank(
    replicas: list[ReplicaView],
    limits: Limits,
    turn: int = 0,
    weights: Weights = Weights(),
) -> tuple[list[str], str]:
    """Available, unsaturated replicas in the order to try them, and why the first won:
    "prefix" (it holds more of the prompt), "session" (the session's last replica),
    or "load" (the least work ahead)."""
    usable = [r for r in replicas if r.available and not is_saturated(r, limits)]
    if len(usable) < 2:  # no choice to make
        return [r.name for r in usable], "load"
    n = len(replicas)
    position = {r.name: (i - turn) % n for i, r in enumerate(replicas)}
    loads = {r.name: load_score(r.in_flight, r.others) for r in usable}
    credits = {r.name: credit(r, weights) for r in usable}
    usable.sort(
        key=lambda r: (
            r.queued - credits[r.name] + weights.load_tokens * loads[r.name],
            loads[r.name],
            position[r.name],
        )
    )
    best = usable[0]
    rest = max((credits[r.name] for r in usable[1:]), default=0.0)
    why = "load"
    if credits[best.name] > rest:
        best_match = max((r.matched for r in usable[1:]), default=0)
        why = "session" if best.home and best.matched <= best_match else "prefix"
    return [r.name for r in usable], why
