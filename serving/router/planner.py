"""The list of (tier, replica) attempts for one request: pick, spill, fall back. Pure.

- The chosen tier's usable replicas come first, in the order of one score that blends
  the prompt's cached prefix with load (serving/router/balancer.py).
- Spill: if every available replica of the chosen tier is saturated, start at
  the next tier in `order` that has room.
- Fallback: the next tiers' replicas follow, for retries after an error.
- Panic: if every ready replica of a tier is ejected by its breaker, try them anyway
  (Envoy's panic threshold at 100 %): a breaker that guesses wrong must not turn a tier
  that answers into a tier that refuses.
- Nothing usable anywhere: 429 if it is because everything is full, else 503.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from serving.errors import NoEngineReady, Saturated
from serving.router.balancer import Limits, ReplicaView, Weights, is_saturated, rank
from serving.router.registry import Endpoint, Tier


@dataclass(frozen=True)
class Attempt:
    tier: Tier
    endpoint: Endpoint
    why: str  # prefix | session | load | spill | fallback | panic


@dataclass(frozen=True)
class Placement:
    """What a request brings to the replica choice: its prompt's block keys per tier
    (serving/router/prefix.py; tiers may differ in tokenizer and block size) and its
    session, if it named one."""

    keys: dict[str, Sequence[int]] = field(default_factory=dict)
    session: str | None = None


def _views(
    tier: Tier, now: float, placement: Placement | None, panic: bool = False
) -> list[ReplicaView]:
    keys = placement.keys.get(tier.name) if placement else None
    home = tier.sessions.get(placement.session) if placement and placement.session else None
    return [
        ReplicaView(
            ep.name,
            ep.load,
            ep.in_flight,
            available=bool(ep.ready and ep.url and (panic or ep.breaker.peek(now))),
            matched=ep.prefix.match(keys, now) * tier.block_size if keys else 0,
            home=ep.name == home,
            queued=ep.prefill_queued,
            others=ep.others,
        )
        for ep in tier.endpoints
    ]


def _ranked(
    tier: Tier, views: list[ReplicaView], limits: Limits, turn: int, weights: Weights
) -> tuple[list[Endpoint], str]:
    names, why = rank(views, limits, turn, weights)
    by_name = {ep.name: ep for ep in tier.endpoints}
    return [by_name[n] for n in names], why


def tier_sequence(chosen: Tier, tiers: list[Tier], order: list[str]) -> list[Tier]:
    """The chosen tier, then the tiers after it in `order`.

    With no `order` configured there is no cross-tier spill or fallback: another
    tier may be another model, and that has to be asked for.
    """
    if chosen.name not in order:
        return [chosen]
    by_name = {t.name: t for t in tiers}
    return [chosen, *(by_name[n] for n in order[order.index(chosen.name) + 1 :])]


def plan(
    chosen: Tier,
    tiers: list[Tier],
    order: list[str],
    limits: Limits,
    now: float,
    placement: Placement | None,
    max_attempts: int,
    retry_after_s: int,
    turn: int = 0,
    weights: Weights = Weights(),  # noqa: B008 (frozen)
) -> list[Attempt]:
    sequence = tier_sequence(chosen, tiers, order)
    attempts: list[Attempt] = []
    full = 0  # available but saturated replicas seen
    chosen_full = False
    for i, tier in enumerate(sequence):
        views = _views(tier, now, placement)
        panic = not any(v.available for v in views) and any(ep.ready for ep in tier.endpoints)
        if panic:
            views = _views(tier, now, placement, panic=True)
        ranked, why = _ranked(tier, views, limits, turn, weights)
        if panic:
            why = "panic"
        full += sum(v.available and is_saturated(v, limits) for v in views)
        if i == 0:
            # Room nowhere in the chosen tier, though it is up: spill, not fallback.
            chosen_full = not ranked and any(v.available for v in views)
        elif not panic:
            why = "spill" if chosen_full else "fallback"
        attempts += [Attempt(tier, ep, why) for ep in ranked]
    if not attempts:
        if full:
            raise Saturated(
                f"Every replica for '{chosen.model}' is at capacity; retry after {retry_after_s}s.",
                retry_after_s,
            )
        raise NoEngineReady(f"No engine serving '{chosen.model}' is ready; retry shortly.")
    return attempts[:max_attempts]
