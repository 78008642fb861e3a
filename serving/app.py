"""The app factory: builds the gateway and hangs its services on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI

from serving.api.routes import router
from serving.api.serving import ProxyService
from serving.config import Settings
from serving.engines.supervisor import Supervisor
from serving.errors import install_error_handlers
from serving.metrics import GatewayMetrics
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.client import UpstreamClient, build_http_client
from serving.upstream.health import health_loop


def build_registry(settings: Settings) -> EngineRegistry:
    registry = EngineRegistry()
    for engine in settings.engines:
        supervised = engine.url is None
        registry.add(
            Endpoint(
                name=engine.name,
                model=engine.model_name,
                url=engine.url,
                supervised=supervised,
                state="starting" if supervised else "external",
                max_model_len=engine.args.get("max_model_len"),
            )
        )
    return registry


def create_app(
    settings: Settings,
    registry: EngineRegistry | None = None,
    metrics: GatewayMetrics | None = None,
    supervisor: Supervisor | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the gateway. With a supervisor, its engines start and stop with the app."""
    registry = registry or build_registry(settings)
    metrics = metrics or GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = build_http_client(
            settings.timeouts, settings.server.max_upstream_connections, transport
        )
        app.state.proxy = ProxyService(
            registry, UpstreamClient(http), metrics, settings.server.max_body_bytes
        )
        if supervisor is not None:
            supervisor.start(http)
        health = asyncio.create_task(
            health_loop(
                http,
                registry,
                metrics,
                settings.timeouts.health_interval,
                settings.timeouts.connect,
            )
        )
        try:
            yield
        finally:
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            if supervisor is not None:
                await supervisor.stop()
            await http.aclose()

    app = FastAPI(title="tiergate", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.supervisor = supervisor
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    return app
