"""Replica order within a tier: affinity first, unless that replica is saturated. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from serving.router.load import EngineLoad, load_score, saturated


@dataclass(frozen=True)
class ReplicaView:
    name: str
    load: EngineLoad
    in_flight: int
    available: bool  # ready and its breaker lets a request through


@dataclass(frozen=True)
class Limits:
    max_waiting: float
    max_kv_usage: float
    max_in_flight: int


def is_saturated(r: ReplicaView, limits: Limits) -> bool:
    return saturated(
        r.load, r.in_flight, limits.max_waiting, limits.max_kv_usage, limits.max_in_flight
    )


def rank(
    replicas: list[ReplicaView],
    limits: Limits,
    affinity_order: list[str] | None = None,
    turn: int = 0,
) -> tuple[list[str], str]:
    """Available, unsaturated replicas in the order to try them, and why the first won.

    With an affinity order (from the hash ring), the session's home replica comes
    first unless it is saturated; the rest follow by load.
    """
    usable = [r for r in replicas if r.available and not is_saturated(r, limits)]
    if len(usable) > 1:
        n = len(replicas)
        position = {r.name: (i - turn) % n for i, r in enumerate(replicas)}
        usable.sort(key=lambda r: (load_score(r.load, r.in_flight), position[r.name]))
    names = [r.name for r in usable]
    if affinity_order:
        known = {r.name for r in replicas}
        home = next((n for n in affinity_order if n in known), None)
        if home in names:
            return [home, *[n for n in names if n != home]], "affinity"
        if names:
            return names, "affinity_yielded"
    return names, "least_loaded"
