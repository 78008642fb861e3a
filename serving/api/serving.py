"""The proxy service behind /v1/chat/completions and /v1/completions.

Reads and checks the body, picks an engine, primes the upstream request, then
returns the answer or relays the stream, and records metrics on the way out.
"""

from __future__ import annotations

import json
import time

from fastapi import Request
from fastapi.responses import Response

from serving.api.protocol import Kind, parse_request
from serving.errors import GatewayError, PayloadTooLarge
from serving.metrics import GatewayMetrics
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.client import UpstreamClient
from serving.upstream.stream import ProxyStreamResponse, StreamOutcome, relay, usage_of

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


class ProxyService:
    def __init__(
        self,
        registry: EngineRegistry,
        upstream: UpstreamClient,
        metrics: GatewayMetrics,
        max_body_bytes: int,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request, kind: Kind) -> Response:
        started = time.perf_counter()
        path = _PATHS[kind]
        model = "unknown"
        try:
            raw = await read_body(request, self.max_body_bytes)
            checked, payload = parse_request(kind, raw)
            endpoint = self.registry.pick(checked.model)
            model = checked.model  # a label only once known: clients cannot add series
            if checked.stream:
                return await self._stream(endpoint, path, payload, started)
            return await self._unary(endpoint, path, raw, model, started)
        except GatewayError as exc:
            self.metrics.requests.labels(model, path, str(exc.status)).inc()
            raise

    async def _unary(
        self, endpoint: Endpoint, path: str, raw: bytes, model: str, started: float
    ) -> Response:
        self._enter(endpoint)
        try:
            response = await self.upstream.open(endpoint.url or "", path, raw)
            try:
                body = await response.aread()
            finally:
                await response.aclose()
        finally:
            self._leave(endpoint)
        usage = usage_of(body)
        self.metrics.record_usage(model, usage)
        self.metrics.e2e.labels(model).observe(time.perf_counter() - started)
        self.metrics.requests.labels(model, path, str(response.status_code)).inc()
        return Response(body, status_code=response.status_code, media_type="application/json")

    async def _stream(
        self, endpoint: Endpoint, path: str, payload: dict, started: float
    ) -> Response:
        model = payload["model"]
        options = payload.get("stream_options") or {}
        drop_usage = not options.get("include_usage")
        if drop_usage:  # ask for usage anyway so token metrics are exact; hidden below
            payload = {**payload, "stream_options": {**options, "include_usage": True}}
        self._enter(endpoint)
        try:
            response = await self.upstream.open(
                endpoint.url or "", path, json.dumps(payload).encode()
            )
        except BaseException:
            self._leave(endpoint)
            raise
        outcome = StreamOutcome(started=started)

        def on_close(disconnected: bool) -> None:
            self._leave(endpoint)
            self._record_stream(model, path, outcome, disconnected)

        return ProxyStreamResponse(relay(response, outcome, drop_usage), on_close)

    def _record_stream(
        self, model: str, path: str, outcome: StreamOutcome, disconnected: bool
    ) -> None:
        m = self.metrics
        m.requests.labels(model, path, "200").inc()
        if outcome.first_byte is not None:
            m.ttft.labels(model).observe(outcome.first_byte - outcome.started)
        m.e2e.labels(model).observe(time.perf_counter() - outcome.started)
        m.record_usage(model, outcome.usage)
        if outcome.error:
            m.stream_errors.labels(model, outcome.error).inc()
        if disconnected:
            m.client_disconnects.labels(model).inc()

    def _enter(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        self.metrics.in_flight.labels(endpoint.name).inc()

    def _leave(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        self.metrics.in_flight.labels(endpoint.name).dec()
