"""Prometheus metrics of the gateway, on a registry owned by the app (no globals).

With `server.workers` > 1 every worker process writes its values to files under
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode, set up by
serving/workers.py) and `/metrics`, whichever worker answers it, sums them all.
Gauges say how to combine workers: in-flight counts add up, states take the max.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

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
            multiprocess_mode="livesum",
        )
        self.engine_ready = Gauge(
            "tiergate_engine_ready",
            "1 when the engine answers /health.",
            ["engine"],
            registry=r,
            multiprocess_mode="max",
        )
        # Each engine's load as the router last scraped it (router.scrape_interval): an
        # embedded engine's own /metrics is on a loopback port no Prometheus reaches.
        self.engine_waiting, self.engine_running, self.engine_kv = (
            Gauge(name, doc, ["engine"], registry=r, multiprocess_mode="livemostrecent")
            for name, doc in (
                ("tiergate_engine_requests_waiting", "The engine's queue, as last scraped."),
                ("tiergate_engine_requests_running", "The engine's batch, as last scraped."),
                ("tiergate_engine_kv_cache_usage", "The engine's KV-cache use (0-1), scraped."),
            )
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
            multiprocess_mode="max",
        )
        self.cost = Counter(
            "tiergate_estimated_cost",
            "Estimated cost from usage and the tier's prices.",
            ["tier"],
            registry=r,
        )

        # The prefix index (serving/router/prefix.py) and the KV events that feed it.
        self.prefix_tokens = Counter(
            "tiergate_prefix_prompt_tokens",
            "Prompt tokens in full blocks looked up in the prefix index, by tier.",
            ["tier"],
            registry=r,
        )
        self.prefix_matched = Counter(
            "tiergate_prefix_matched_tokens",
            "Of those, tokens the chosen replica held (or had just been sent), by tier.",
            ["tier"],
            registry=r,
        )
        self.prefix_blocks = Gauge(
            "tiergate_prefix_index_blocks",
            "Blocks in each replica's prefix index (bounded: approx_blocks, or the engine's "
            "own cache when fed by its events).",
            ["engine", "source"],
            registry=r,
            multiprocess_mode="max",
        )
        self.kv_events = Counter(
            "tiergate_kv_events",
            "KV-event batches from each engine: received, dropped (a gap or a restart "
            "emptied the index) or replayed.",
            ["engine", "outcome"],
            registry=r,
        )
        self.kv_last_event = Gauge(
            "tiergate_kv_events_last_timestamp_seconds",
            "When the last KV-event batch came from each engine (staleness: time() - it).",
            ["engine"],
            registry=r,
            multiprocess_mode="max",
        )

        self.admission = Counter(
            "tiergate_admission_refused",
            "Requests refused by the gateway's own admission (429), by reason.",
            ["reason"],
            registry=r,
        )
        self.paced = Counter(
            "tiergate_admission_paced",
            "Refused connections left unread for their Retry-After-Ms, past "
            "server.max_refusals_s: clients that re-send at once.",
            registry=r,
        )
        self.retry_after_scale = Gauge(
            "tiergate_admission_retry_after_scale",
            "How many times router.spill.retry_after_s the max_in_flight 429s (the "
            "gateway's, or under server.front the front's) now ask "
            "clients to wait: above 1 in a sustained overload (server.retry_after_max_scale).",
            registry=r,
            multiprocess_mode="max",
        )
        # Per tenant and key name (never the key), for chargeback and fairness; the
        # operator creates tenants and keys, so the label sets stay small.
        self.tenant_requests = Counter(
            "tiergate_tenant_requests",
            "Answered requests per tenant, key and tier.",
            ["tenant", "key", "tier"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "tiergate_tenant_tokens",
            "Tokens per tenant, key and tier, from the engines' usage.",
            ["tenant", "key", "tier", "kind"],
            registry=r,
        )
        self.tenant_cost = Counter(
            "tiergate_tenant_estimated_cost",
            "Estimated cost per tenant and tier, from the tier's prices.",
            ["tenant", "tier"],
            registry=r,
        )
        self.tenant_refused = Counter(
            "tiergate_tenant_refused",
            "Requests refused per tenant: rate_limit_exceeded, insufficient_quota, "
            "model_not_allowed.",
            ["tenant", "reason"],
            registry=r,
        )
        # The PostgreSQL key store (tenancy.database_url), keyed by PgTenancy.health()'s
        # fields and set once a second off the request path: an outage shows here before
        # any key goes stale.
        self.tenancy = {
            field: Gauge(name, doc, registry=r, multiprocess_mode=mode)
            for field, name, mode, doc in (
                ("connected", "tiergate_tenancy_store_connected", "livemin",
                 "1 while the PostgreSQL key store answers (the lowest over workers)."),
                ("contact_age_s", "tiergate_tenancy_store_contact_age_seconds", "livemax",
                 "Seconds since the key store last answered; cached keys get 503 past "
                 "tenancy.max_stale_s."),
                ("keys", "tiergate_tenancy_keys", "livemax",
                 "Live keys in this gateway's snapshot of the key store."),
                ("buffered_rows", "tiergate_tenancy_usage_rows_buffered", "livesum",
                 "Usage rows waiting to be written to the key store (summed over workers)."),
                ("dropped_rows", "tiergate_tenancy_usage_rows_dropped", "livesum",
                 "Usage rows dropped because the buffer was full during an outage."),
            )
        }  # fmt: skip
        self.loop_lag = Gauge(
            "tiergate_event_loop_lag_milliseconds",
            "How late the gateway's event loop runs (admission refuses past a limit).",
            registry=r,
            multiprocess_mode="max",
        )

        # Label lookups cost a lock and a tuple hash each; the hot path asks for the same
        # few children again and again, so they are looked up once and kept here.
        self._children: dict[tuple, Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def exposition(self) -> bytes:
        """The text /metrics serves: this process's registry, or every worker's."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def engine_load(self, engine: str, waiting: float, running: float, kv: float) -> None:
        self._child(self.engine_waiting, engine).set(waiting)
        self._child(self.engine_running, engine).set(running)
        self._child(self.engine_kv, engine).set(kv)

    def forget_engine(self, engine: str) -> None:
        """An engine discovery dropped: its series go (a scrape may have set none)."""
        for metric in (
            self.engine_ready,
            self.engine_waiting,
            self.engine_running,
            self.engine_kv,
            self.kv_last_event,
        ):
            self._children.pop((id(metric), engine), None)
            with contextlib.suppress(KeyError):
                metric.remove(engine)
        for source in ("events", "approximate"):
            with contextlib.suppress(KeyError):
                self.prefix_blocks.remove(engine, source)

    def prefix_lookup(self, tier: str, tokens: int, matched: int) -> None:
        self._child(self.prefix_tokens, tier).inc(tokens)
        if matched:
            self._child(self.prefix_matched, tier).inc(matched)

    def tenancy_store(self, health: dict[str, float]) -> None:
        """PgTenancy.health(), once a second."""
        for field, value in health.items():
            self.tenancy[field].set(value)

    def admission_refused(self, reason: str, n: int = 1) -> None:
        self._child(self.admission, reason).inc(n)

    def refusal_counter(self, reason: str, endpoint: str, status: int) -> Callable[[], None]:
        """Counts one admission refusal: both counters' children looked up once, here."""
        refused = self._child(self.admission, reason).inc
        done = self._child(self.requests, "unknown", endpoint, str(status)).inc

        def count() -> None:
            refused()
            done()

        return count

    def request_done(self, model: str, endpoint: str, status: int, n: int = 1) -> None:
        self._child(self.requests, model, endpoint, str(status)).inc(n)

    def tier_done(self, tier: str, replica: str, status: int) -> None:
        self._child(self.tier_requests, tier, replica, str(status)).inc()

    def decision(self, tier: str, reason: str) -> None:
        self._child(self.decisions, tier, reason).inc()

    def latency(self, model: str, ttft: float | None, e2e: float) -> None:
        if ttft is not None:
            self._child(self.ttft, model).observe(ttft)
        self._child(self.e2e, model).observe(e2e)

    def in_flight_add(self, engine: str, delta: int) -> None:
        self._child(self.in_flight, engine).inc(delta)

    def breaker(self, replica: str, state: int) -> None:
        self._child(self.breaker_state, replica).set(state)

    def cost_of(self, tier: str, amount: float) -> None:
        if amount:
            self._child(self.cost, tier).inc(amount)

    def record_usage(self, model: str, usage: dict | None) -> None:
        if not usage:
            return
        self._child(self.prompt_tokens, model).inc(usage.get("prompt_tokens") or 0)
        self._child(self.completion_tokens, model).inc(usage.get("completion_tokens") or 0)

    def tenant_usage(self, tenant: str, key: str, tier: str, usage: dict | None, cost: float):
        self._child(self.tenant_requests, tenant, key, tier).inc()
        if usage:
            for kind in ("prompt", "completion"):
                n = usage.get(f"{kind}_tokens") or 0
                self._child(self.tenant_tokens, tenant, key, tier, kind).inc(n)
        if cost:
            self._child(self.tenant_cost, tenant, tier).inc(cost)
