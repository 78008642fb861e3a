"""Replica order within a tier: one score that blends cache reuse with load. Pure.

    score(r) = min(matched(r) + session(r), max_credit) - load_tokens * load(r)

- matched(r): prompt tokens replica r holds in its prefix cache (serving/router/prefix.py),
  counted in absolute tokens: a 900-token hit saves 900 tokens of prefill, a share would not say.
- session(r): `session_tokens` when r is where this session (x-session-id or `user`)
  went last, else 0: a strong preference, not a fixed home.
- load(r): serving/router/load.py's load_score: requests running, waiting (twice) and the
  gateway's own in flight, plus KV use.
- load_tokens (W): how many prompt tokens of reuse one more request of load is worth.
- max_credit: the most reuse can buy. A hot prefix cached on one replica moves on once
  that replica holds max_credit / W more requests than another, so one prompt shared by
  all traffic cannot pile everything on one engine while another idles.

The highest score goes first; ties go to the less loaded, then round the replicas by
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


@dataclass(frozen=True)
class Limits:
    max_waiting: float
    max_kv_usage: float
    max_in_flight: int


@dataclass(frozen=True)
class Weights:
    load_tokens: float = 256.0
    max_credit: int = 2048
    session_tokens: int = 1024


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
    or "load"."""
    usable = [r for r in replicas if r.available and not is_saturated(r, limits)]
    if len(usable) < 2:  # no choice to make
        return [r.name for r in usable], "load"
    n = len(replicas)
    position = {r.name: (i - turn) % n for i, r in enumerate(replicas)}
    loads = {r.name: load_score(r.load, r.in_flight) for r in usable}
    credits = {r.name: credit(r, weights) for r in usable}
    usable.sort(
        key=lambda r: (
            weights.load_tokens * loads[r.name] - credits[r.name],
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
