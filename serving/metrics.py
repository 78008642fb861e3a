"""Prometheus metrics of the gateway, on a registry owned by the app (no globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tiergate_requests",
            "Requests by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "tiergate_time_to_first_token_seconds",
            "Time to the first streamed chunk.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tiergate_e2e_request_latency_seconds",
            "Time from request to last byte.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tiergate_prompt_tokens",
            "Prompt tokens, from the engine's usage.",
            ["model"],
            registry=r,
        )
        self.completion_tokens = Counter(
            "tiergate_completion_tokens",
            "Completion tokens, from the engine's usage.",
            ["model"],
            registry=r,
        )
        self.stream_errors = Counter(
            "tiergate_stream_errors",
            "Streams ended by an error event after they started.",
            ["model", "kind"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "tiergate_client_disconnects",
            "Clients that left before the response ended.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "tiergate_requests_in_flight",
            "Requests being proxied now.",
            ["engine"],
            registry=r,
        )
        self.engine_ready = Gauge(
            "tiergate_engine_ready",
            "1 when the engine answers /health.",
            ["engine"],
            registry=r,
        )
        self.engine_restarts = Counter(
            "tiergate_engine_restarts",
            "Restarts of crashed engines.",
            ["engine"],
            registry=r,
        )

        # The router: decisions, spill and fallback, retries, breakers, cost.
        self.decisions = Counter(
            "tiergate_router_decisions",
            "Tier choices by reason (auto rules or explicit).",
            ["tier", "reason"],
            registry=r,
        )
        self.tier_requests = Counter(
            "tiergate_tier_requests",
            "Requests served by tier and replica.",
            ["tier", "replica", "status"],
            registry=r,
        )
        self.spills = Counter(
            "tiergate_spills",
            "Requests sent to another tier because theirs was full.",
            ["from_tier", "to_tier"],
            registry=r,
        )
        self.fallbacks = Counter(
            "tiergate_fallbacks",
            "Requests served by another tier after errors.",
            ["from_tier", "to_tier"],
            registry=r,
        )
        self.retries = Counter(
            "tiergate_retries",
            "Retries before the first byte, by the replica retried on.",
            ["tier", "replica", "reason"],
            registry=r,
        )
        self.retry_budget_exhausted = Counter(
            "tiergate_retry_budget_exhausted",
            "Retries refused by the retry budget.",
            registry=r,
        )
        self.upstream_failures = Counter(
            "tiergate_upstream_failures",
            "Failed attempts on a replica.",
            ["tier", "replica", "code"],
            registry=r,
        )
        self.breaker_state = Gauge(
            "tiergate_circuit_state",
            "Circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["replica"],
            registry=r,
        )
        self.cost = Counter(
            "tiergate_estimated_cost",
            "Estimated cost from usage and the tier's prices.",
            ["tier"],
            registry=r,
        )

    def record_usage(self, model: str, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens.labels(model).inc(usage.get("prompt_tokens") or 0)
        self.completion_tokens.labels(model).inc(usage.get("completion_tokens") or 0)
