"""Engines (replicas) and tiers, with their live state. No FastAPI, no httpx.

The supervisor and the health/scrape loops write readiness and load here; the
proxy reads it through `plan` in serving/router/planner.py.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from serving.errors import ModelNotFound
from serving.router.breaker import CircuitBreaker
from serving.router.load import FILTERED_PATH, EngineLoad
from serving.router.prefix import ReplicaIndex

MAX_SESSIONS = 100_000  # per tier, least recently used first out (~10 MB at most)


@dataclass
class Endpoint:
    name: str
    model: str  # the name the engine itself serves
    url: str | None = None  # None until a supervised engine has a port
    ready: bool = False
    seen_ready: bool = False  # it has been ready once: when down, it is expected back
    supervised: bool = False
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0
    prefill_queued: int = 0  # prompt tokens routed here whose first token is not back yet
    others: float = 0.0  # the engine's requests from elsewhere, at the last scrape
    state: str = "starting"  # starting | ready | down | failed | stopped | external
    max_model_len: int | None = None
    last_error: str | None = None
    load: EngineLoad = field(default_factory=EngineLoad)
    scrape_path: str = FILTERED_PATH  # FULL_PATH once the filtered answer had no load
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    prefix: ReplicaIndex = field(default_factory=ReplicaIndex)
    kv_events: str | None = None  # the engine's KV-event publisher (tcp:// or ipc://)
    kv_replay: str | None = None  # and its replay socket, if it has one


@dataclass
class Tier:
    name: str
    model: str  # the public name clients send
    endpoints: list[Endpoint]
    input_cost_per_1k: float = 0.0
    output_cost_per_1k: float = 0.0
    max_context: int | None = None
    max_output_tokens: int | None = None
    sources: list[str] = field(default_factory=list)  # configured engine names
    block_size: int = 128  # the engines' KV block, in tokens (prefix keys are cut by it)
    task: str = "generate"  # or "embed": /v1/embeddings only
    sessions: OrderedDict[str, str] = field(default_factory=OrderedDict)  # -> replica

    def coming_back(self) -> bool:
        """Whether a replica is down but expected back (restarting, draining for a
        restart, starting): worth holding a request for (router.wait_ready_s)."""
        return any(
            not ep.ready
            and ep.state in ("starting", "down", "draining")
            and (ep.supervised or ep.seen_ready)
            for ep in self.endpoints
        )

    def set_endpoints(self, endpoints: list[Endpoint]) -> None:
        """Replace the replicas (a new list: a request already planning keeps its own)."""
        self.endpoints = endpoints

    def remember(self, session: str, replica: str) -> None:
        """Where a session's request went: its next turn prefers it (balancer.py)."""
        sessions = self.sessions
        sessions[session] = replica
        sessions.move_to_end(session)
        if len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)

    def cost(self, usage: dict | None) -> float:
        if not usage:
            return 0.0
        return (
            (usage.get("prompt_tokens") or 0) * self.input_cost_per_1k
            + (usage.get("completion_tokens") or 0) * self.output_cost_per_1k
        ) / 1000


@dataclass
class EngineRegistry:
    endpoints: list[Endpoint] = field(default_factory=list)
    tiers: list[Tier] = field(default_factory=list)
    auto_model: str = "auto"

    def add(self, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)

    def remove(self, name: str) -> Endpoint:
        ep = self.get(name)
        self.endpoints = [e for e in self.endpoints if e is not ep]
        return ep

    def get(self, name: str) -> Endpoint:
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        raise KeyError(name)

    def tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def models(self) -> list[str]:
        """Public model names: each tier's, then the virtual auto model."""
        return [*dict.fromkeys(t.model for t in self.tiers), self.auto_model]

    def tier_for_model(self, model: str) -> Tier | None:
        """The tier a client named, or None for the auto model."""
        if model == self.auto_model:
            return None
        for tier in self.tiers:
            if tier.model == model:
                return tier
        raise ModelNotFound(
            f"The model '{model}' does not exist. Available: {', '.join(self.models())}",
            param="model",
        )

    def any_ready(self) -> bool:
        return any(ep.ready for ep in self.endpoints)
