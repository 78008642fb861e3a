"""Which engines exist, which are ready, and which one takes the next request.

Pure state and policy: no FastAPI, no httpx. The supervisor and the health
checker write readiness here; the gateway reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.errors import ModelNotFound, NoEngineReady


@dataclass
class Endpoint:
    name: str
    model: str  # the name clients send in `model`
    url: str | None = None  # None until a supervised engine has a port
    ready: bool = False
    supervised: bool = False
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0
    state: str = "starting"  # starting | ready | down | failed | external
    max_model_len: int | None = None
    last_error: str | None = None


@dataclass
class EngineRegistry:
    endpoints: list[Endpoint] = field(default_factory=list)
    _turn: int = 0

    def add(self, endpoint: Endpoint) -> None:
        self.endpoints.append(endpoint)

    def get(self, name: str) -> Endpoint:
        for ep in self.endpoints:
            if ep.name == name:
                return ep
        raise KeyError(name)

    def models(self) -> list[str]:
        return list(dict.fromkeys(ep.model for ep in self.endpoints))

    def any_ready(self) -> bool:
        return any(ep.ready for ep in self.endpoints)

    def pick(self, model: str) -> Endpoint:
        """Least in-flight ready endpoint for `model`; ties go round-robin."""
        serving = [ep for ep in self.endpoints if ep.model == model]
        if not serving:
            raise ModelNotFound(
                f"The model '{model}' does not exist. Available: {', '.join(self.models())}",
                param="model",
            )
        ready = [ep for ep in serving if ep.ready and ep.url]
        if not ready:
            raise NoEngineReady(f"No engine serving '{model}' is ready; retry shortly.")
        self._turn += 1
        least = min(ep.in_flight for ep in ready)
        tied = [ep for ep in ready if ep.in_flight == least]
        return tied[self._turn % len(tied)]
