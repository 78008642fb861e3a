"""The proxy service behind /v1/chat/completions and /v1/completions.

Reads and checks the body, resolves the tier (or lets the auto policy pick one),
plans the replicas to try, and opens the first that answers. Until the first
body byte has been received nothing has reached the client, so errors up to
then are retried on another replica or tier, within the retry budget. After
that, a stream can only end with an error event.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response

from serving.api.protocol import Kind, parse_request
from serving.config import RouterSettings
from serving.errors import (
    GatewayError,
    InvalidRequest,
    NoEngineReady,
    PayloadTooLarge,
    UpstreamError,
    UpstreamStatusError,
    UpstreamTimeout,
)
from serving.metrics import GatewayMetrics
from serving.router.balancer import Limits
from serving.router.breaker import RetryBudget
from serving.router.planner import Attempt, plan
from serving.router.policy import Decision, Features, TierView, choose_tier
from serving.router.registry import Endpoint, EngineRegistry, Tier
from serving.router.tokens import TokenCounter
from serving.upstream.client import UpstreamClient
from serving.upstream.stream import ProxyStreamResponse, StreamOutcome, prime, relay, usage_of

_PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing anything over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"Request body of {declared} bytes exceeds the {limit}-byte limit.")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.")
        chunks.append(chunk)
    return b"".join(chunks)


def features_of(request: Request, payload: dict[str, Any], counts: dict[str, int]) -> Features:
    metadata = payload.get("metadata") if isinstance(payload.get("metadata"), dict) else {}
    response_format = payload.get("response_format")
    return Features(
        prompt_tokens=counts,
        max_tokens=payload.get("max_completion_tokens") or payload.get("max_tokens"),
        has_tools=bool(payload.get("tools") or payload.get("functions")),
        has_response_format=bool(response_format) and response_format != {"type": "text"},
        hint=request.headers.get("x-tiergate-tier") or metadata.get("tier"),
    )


def affinity_key(request: Request, payload: dict[str, Any], prefix_chars: int) -> str:
    """Session header, else `user`, else the prompt's prefix (so its KV cache is reused)."""
    session = request.headers.get("x-session-id") or payload.get("user")
    if session:
        return f"s:{session}"
    head = payload.get("messages") or payload.get("prompt") or ""
    parts, size = [], 0
    for item in head if isinstance(head, list) else [head]:
        parts.append(json.dumps(item, separators=(",", ":")))  # only what the prefix needs
        size += len(parts[-1])
        if size >= prefix_chars:
            break
    text = "".join(parts)[:prefix_chars]
    return "p:" + hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class ProxyService:
    def __init__(
        self,
        registry: EngineRegistry,
        upstream: UpstreamClient,
        metrics: GatewayMetrics,
        max_body_bytes: int,
        router: RouterSettings,
        tokens: TokenCounter | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.router = router
        self.tokens = tokens
        self.clock = clock
        self.limits = Limits(
            router.spill.max_waiting, router.spill.max_kv_usage, router.spill.max_in_flight
        )
        self.budget = RetryBudget(router.retry.budget_ratio, router.retry.min_retries)
        self.turns = itertools.count()  # rotates ties between equally loaded replicas
        self.views = [TierView(t.name, t.max_context, t.max_output_tokens) for t in registry.tiers]

    async def handle(self, request: Request, kind: Kind) -> Response:
        started = time.perf_counter()
        path = _PATHS[kind]
        model = "unknown"
        try:
            raw = await read_body(request, self.max_body_bytes)
            checked, payload = parse_request(kind, raw)
            tier = self.registry.tier_for_model(checked.model)
            model = checked.model  # a label only once known: clients cannot add series
            counts: dict[str, int] | None = None
            if tier is None:
                counts = await self._count(payload)
                decision = choose_tier(
                    features_of(request, payload, counts), self.views, self.router.rules
                )
            else:
                decision = Decision(tier.name, "explicit")
            tier = self.registry.tier(decision.tier)
            await self._check_limits(tier, payload, counts)
            self.metrics.decisions.labels(tier.name, decision.reason).inc()
            key = (
                affinity_key(request, payload, self.router.affinity_prefix_chars)
                if self.router.affinity
                else None
            )
            attempts = plan(
                tier,
                self.registry.tiers,
                self.router.order,
                self.limits,
                self.clock(),
                key,
                self.router.retry.max_attempts,
                self.router.spill.retry_after_s,
                turn=next(self.turns),
            )
            self.budget.record_request(self.clock())
            if checked.stream:
                return await self._stream(attempts, path, payload, model, decision, started)
            return await self._unary(attempts, path, raw, payload, model, decision, started)
        except GatewayError as exc:
            self.metrics.requests.labels(model, path, str(exc.status)).inc()
            raise

    async def _count(self, payload: dict[str, Any]) -> dict[str, int]:
        """Prompt tokens per tier, off the event loop (long prompts take milliseconds)."""
        if self.tokens is None:
            raise InvalidRequest(
                "Routing by prompt length needs a tokenizer for every tier; set "
                "tiers[].tokenizer for tiers whose engines are external.",
                param="model",
            )
        return await asyncio.to_thread(self.tokens.count_all, payload)

    async def _check_limits(
        self, tier: Tier, payload: dict[str, Any], counts: dict[str, int] | None
    ) -> None:
        """A tier's own limits, where they are tighter than what its engines enforce."""
        max_out = payload.get("max_completion_tokens") or payload.get("max_tokens")
        if tier.max_output_tokens and max_out and max_out > tier.max_output_tokens:
            raise InvalidRequest(
                f"max_tokens is {max_out}, but tier '{tier.name}' allows at most "
                f"{tier.max_output_tokens} output tokens.",
                param="max_tokens",
            )
        engine_limit = min((ep.max_model_len or 0 for ep in tier.endpoints), default=0)
        if not tier.max_context or (engine_limit and engine_limit <= tier.max_context):
            return  # the engine checks it, and says so in the same words
        if counts is None:
            counts = await self._count(payload)
        prompt = counts[tier.name]
        if prompt + (max_out or 0) > tier.max_context:
            raise InvalidRequest(
                f"This model's maximum context length is {tier.max_context} tokens. However, "
                f"you requested {prompt + (max_out or 0)} tokens ({prompt} in the messages, "
                f"{max_out or 0} in the completion).",
                param="messages" if "messages" in payload else "prompt",
                code="context_length_exceeded",
            )

    def _body(self, attempt: Attempt, payload: dict[str, Any], raw: bytes | None) -> bytes:
        """The raw bytes when nothing changes; else the payload with the engine's name."""
        if raw is not None and payload.get("model") == attempt.endpoint.model:
            return raw
        return json.dumps({**payload, "model": attempt.endpoint.model}).encode()

    async def _attempts(
        self,
        attempts: list[Attempt],
        path: str,
        body_for: Callable[[Attempt], bytes],
        read_first: bool,
        chosen: str,
    ):
        """Try each attempt until one answers; yields (attempt, response, first bytes)."""
        last: GatewayError | None = None
        for i, attempt in enumerate(attempts):
            ep, now = attempt.endpoint, self.clock()
            if i > 0:
                if not self.budget.try_spend(now):
                    self.metrics.retry_budget_exhausted.inc()
                    break
                reason = (last.code if last else None) or "unknown"
                self.metrics.retries.labels(attempt.tier.name, ep.name, reason).inc()
            if not ep.breaker.allows(now):
                continue
            self._enter(ep)
            try:
                response = await self.upstream.open(ep.url or "", path, body_for(attempt))
                first: Any = None
                try:
                    first = await (prime(response) if read_first else response.aread())
                except httpx.TimeoutException as exc:
                    await response.aclose()
                    raise UpstreamTimeout(f"The engine stalled before answering: {exc}") from exc
                except httpx.HTTPError as exc:
                    await response.aclose()
                    raise UpstreamError(
                        f"The engine failed before the first byte: {type(exc).__name__}"
                    ) from exc
            except UpstreamStatusError as exc:
                self._leave(ep)
                if exc.status < 500:
                    ep.breaker.success()  # the engine is fine; the request is not
                    raise
                last = self._failed(attempt, exc, now)
                continue
            except (NoEngineReady, UpstreamError) as exc:
                self._leave(ep)
                last = self._failed(attempt, exc, now)
                continue
            ep.breaker.success()
            self.metrics.breaker_state.labels(ep.name).set(0)
            if attempt.why in ("spill", "fallback"):
                counter = self.metrics.spills if attempt.why == "spill" else self.metrics.fallbacks
                counter.labels(chosen, attempt.tier.name).inc()
            return attempt, response, first
        raise last or NoEngineReady("No replica could take the request; retry shortly.")

    def _failed(self, attempt: Attempt, exc: GatewayError, now: float) -> GatewayError:
        ep = attempt.endpoint
        ep.breaker.failure(now)
        self.metrics.breaker_state.labels(ep.name).set(
            {"closed": 0, "half_open": 1, "open": 2}[ep.breaker.state]
        )
        self.metrics.upstream_failures.labels(attempt.tier.name, ep.name, exc.code or "").inc()
        return exc

    def _headers(self, attempt: Attempt, decision: Decision) -> dict[str, str]:
        reason = (
            decision.reason
            if attempt.why not in ("spill", "fallback")
            else (f"{decision.reason}+{attempt.why}")
        )
        return {
            "x-tiergate-tier": attempt.tier.name,
            "x-tiergate-reason": reason,
            "x-tiergate-replica": attempt.endpoint.name,
        }

    async def _unary(
        self,
        attempts: list[Attempt],
        path: str,
        raw: bytes,
        payload: dict[str, Any],
        model: str,
        decision: Decision,
        started: float,
    ) -> Response:
        attempt, response, body = await self._attempts(
            attempts,
            path,
            lambda a: self._body(a, payload, raw),
            read_first=False,
            chosen=decision.tier,
        )
        self._leave(attempt.endpoint)
        await response.aclose()
        self._record(
            attempt.tier, attempt, model, path, str(response.status_code), usage_of(body), started
        )
        return Response(
            body,
            status_code=response.status_code,
            media_type="application/json",
            headers=self._headers(attempt, decision),
        )

    async def _stream(
        self,
        attempts: list[Attempt],
        path: str,
        payload: dict[str, Any],
        model: str,
        decision: Decision,
        started: float,
    ) -> Response:
        options = payload.get("stream_options") or {}
        drop_usage = not options.get("include_usage")
        if drop_usage:  # ask for usage anyway so token metrics are exact; hidden below
            payload = {**payload, "stream_options": {**options, "include_usage": True}}
        attempt, response, (first, chunks) = await self._attempts(
            attempts,
            path,
            lambda a: self._body(a, payload, None),
            read_first=True,
            chosen=decision.tier,
        )
        outcome = StreamOutcome(started=started, first_byte=time.perf_counter())

        def on_close(disconnected: bool) -> None:
            self._leave(attempt.endpoint)
            self._record(
                attempt.tier,
                attempt,
                model,
                path,
                "200",
                outcome.usage,
                started,
                outcome.first_byte,
            )
            if outcome.error:
                self.metrics.stream_errors.labels(model, outcome.error).inc()
            if disconnected:
                self.metrics.client_disconnects.labels(model).inc()

        return ProxyStreamResponse(
            relay(response, first, chunks, outcome, drop_usage),
            on_close,
            headers=self._headers(attempt, decision),
        )

    def _record(
        self,
        tier: Tier,
        attempt: Attempt,
        model: str,
        path: str,
        status: str,
        usage: dict | None,
        started: float,
        first_byte: float | None = None,
    ) -> None:
        m = self.metrics
        m.requests.labels(model, path, status).inc()
        m.tier_requests.labels(tier.name, attempt.endpoint.name, status).inc()
        if first_byte is not None:
            m.ttft.labels(model).observe(first_byte - started)
        m.e2e.labels(model).observe(time.perf_counter() - started)
        m.record_usage(model, usage)
        m.cost.labels(tier.name).inc(tier.cost(usage))

    def _enter(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        self.metrics.in_flight.labels(endpoint.name).inc()

    def _leave(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.metrics.in_flight.labels(endpoint.name).dec()
