"""The app factory: builds the gateway and hangs its services on app.state."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from serving.api.access_log import AccessLog
from serving.api.admission import AdmittingProtocol
from serving.api.hotpath import ROUTES, HotPath, LoopLag
from serving.api.openapi import add_hot_routes
from serving.api.routes import operator, router, v1
from serving.api.serving import ProxyService
from serving.config import Settings
from serving.engines.cpu import is_cpu_build
from serving.engines.defaults import tier_tasks
from serving.engines.supervisor import Supervisor
from serving.errors import install_error_handlers
from serving.metrics import GatewayMetrics
from serving.router.breaker import CircuitBreaker
from serving.router.prefix import ReplicaIndex
from serving.router.registry import Endpoint, EngineRegistry, Tier
from serving.router.tokens import TokenCounter
from serving.tasks import cancel_and_wait
from serving.tenants.auth import Authenticator
from serving.tenants.limits import TenantLimiter
from serving.tenants.pg_gateway import PgTenancy
from serving.tenants.redis_limits import RedisLimiter
from serving.tenants.store import TenantStore
from serving.tenants.usage import UsageLedger, flush_loop
from serving.upstream.client import UpstreamClient
from serving.upstream.discovery import Discovery
from serving.upstream.health import check_once, health_loop, scrape_loop
from serving.upstream.kv_events import Feeds


def build_registry(settings: Settings) -> EngineRegistry:
    breaker = settings.router.breaker
    registry = EngineRegistry(auto_model=settings.router.auto_model)
    for engine in settings.engines:
        if engine.discover is not None:
            continue  # its replicas come and go with DNS (serving/upstream/discovery.py)
        supervised = engine.supervised
        registry.add(
            Endpoint(
                name=engine.name,
                model=engine.model_name,
                url=engine.url,
                kv_events=engine.kv_events,
                kv_replay=engine.kv_replay,
                supervised=supervised,
                state="starting" if supervised else "external",
                max_model_len=engine.args.get("max_model_len"),
                breaker=CircuitBreaker(breaker.failures, breaker.cooldown, breaker.half_open_share),
            )
        )
    discovered = {e.name for e in settings.engines if e.discover is not None}
    tasks = tier_tasks(settings)
    for tier in settings.effective_tiers():
        endpoints = [registry.get(name) for name in tier.engines if name not in discovered]
        registry.tiers.append(
            Tier(
                name=tier.name,
                sources=list(tier.engines),
                model=tier.model,
                endpoints=endpoints,
                input_cost_per_1k=tier.cost.input_per_1k,
                output_cost_per_1k=tier.cost.output_per_1k,
                max_context=tier.limits.max_context
                or min((ep.max_model_len or 0 for ep in endpoints), default=0)
                or None,
                max_output_tokens=tier.limits.max_output_tokens,
                block_size=block_size(settings, tier.engines),
                task=tasks[tier.name],
            )
        )
    prefix = settings.router.prefix
    for ep in registry.endpoints:
        ep.prefix = ReplicaIndex(prefix.approx_blocks, prefix.pending_s, prefix.max_blocks)
    return registry


def tenant_store(settings: Settings, metrics: GatewayMetrics) -> TenantStore | PgTenancy:
    """Keys, tenants and usage: PostgreSQL for a fleet, else the SQLite file."""
    tenancy = settings.tenancy
    if tenancy.database_url is not None:
        url = tenancy.database_url.get_secret_value()
        return PgTenancy(
            url,
            tenancy.max_stale_s,
            tenancy.usage_retention_days,
            report=metrics.tenancy_store,
        )
    return TenantStore(settings.tenancy_db())


def block_size(settings: Settings, engine_names: list[str]) -> int:
    """The tier's KV block: router.prefix.block_size, else its first engine's block_size
    arg, else vLLM's default where the gateway runs (128 on the CPU build, 16 on GPUs)."""
    if settings.router.prefix.block_size:
        return settings.router.prefix.block_size
    for engine in settings.engines:
        if engine.name in engine_names and engine.args.get("block_size"):
            return int(engine.args["block_size"])
    return 128 if is_cpu_build() else 16


def build_token_counter(settings: Settings, model_dirs: dict[str, Path]) -> TokenCounter | None:
    """Each generating tier's tokenizer: its own setting, else its first supervised
    engine's weights. (Embedding tiers have no chat template; `auto` never picks them.)"""
    paths: dict[str, Path] = {}
    tasks = tier_tasks(settings)
    for tier in settings.effective_tiers():
        if tasks[tier.name] == "embed":
            continue
        path = tier.tokenizer or next(
            (model_dirs[name] for name in tier.engines if name in model_dirs), None
        )
        if path is None:
            return None
        paths[tier.name] = path
    return TokenCounter(paths)


class GatewayApp(FastAPI):
    """FastAPI for the admin and model routes; the hot routes (hotpath.ROUTES) go straight
    to the bare-ASGI hot path (serving/api/hotpath.py), before FastAPI's middleware and
    routing."""

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            kind = ROUTES.get(scope["path"])
            hot = getattr(self.state, "hot", None)
            if kind is not None and hot is not None:
                await hot(kind, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    def openapi(self) -> dict:
        if self.openapi_schema is None:
            registry = self.state.registry
            models = [t.model for t in registry.tiers] + [registry.auto_model]
            self.openapi_schema = add_hot_routes(super().openapi(), models)
        return self.openapi_schema


def create_app(
    settings: Settings,
    registry: EngineRegistry | None = None,
    metrics: GatewayMetrics | None = None,
    supervisor: Supervisor | None = None,
    model_dirs: dict[str, Path] | None = None,
) -> GatewayApp:
    """Build the gateway. With a supervisor, its engines start and stop with the app."""
    registry = registry or build_registry(settings)
    metrics = metrics or GatewayMetrics()
    tokens = build_token_counter(settings, model_dirs or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: GatewayApp) -> AsyncIterator[None]:
        http = UpstreamClient(settings.timeouts, settings.server.max_upstream_connections)
        await http.start()
        access = AccessLog(
            enabled=settings.server.access_log == "json",
            prompt_sample=settings.server.access_log_prompt_sample,
        )
        server = settings.server
        store = tenant_store(settings, metrics) if settings.tenancy.enabled else None
        ledger = UsageLedger(store) if store is not None else None
        auth = Authenticator([k.get_secret_value() for k in server.api_keys], store)
        app.state.auth = auth
        limiter = (
            RedisLimiter(settings.tenancy.redis_url, lease=settings.tenancy.redis_lease)
            if store is not None and settings.tenancy.redis_url
            else TenantLimiter(ledger=ledger)
        )
        proxy = ProxyService(
            registry,
            http,
            metrics,
            settings.router,
            tokens,
            access=access,
            ledger=ledger,
            limiter=limiter,
        )
        # 20 wake-ups a second only when lag sheds load; otherwise the gauge alone needs 2
        lag = LoopLag(0.05 if server.max_loop_lag_ms else 0.5, report=metrics.loop_lag.set)
        app.state.proxy = proxy  # stored Responses (routes.py); the rest is the hot path
        app.state.hot = HotPath(
            proxy,
            metrics,
            auth,
            server.max_body_bytes,
            server.max_in_flight,
            server.max_loop_lag_ms,
            settings.router.spill.retry_after_s,
            lag,
            max_refusals_s=server.max_refusals_s,
            retry_after_max_scale=server.retry_after_max_scale,
        )
        if supervisor is not None:
            supervisor.start(http)
        timeouts = settings.timeouts
        flags = getattr(app.state, "parent_draining", None)  # a worker: the parent's flags
        draining = (lambda name: (flags / name).exists()) if flags is not None else None
        # Before the first request: a worker of server.workers binds its port before this
        # runs, and requests queued there would meet engines not yet asked (503).
        await check_once(http, registry, metrics, timeouts.connect, draining)
        loops = [
            asyncio.create_task(
                health_loop(
                    http, registry, metrics, timeouts.health_interval, timeouts.connect, draining
                )
            ),
            asyncio.create_task(
                scrape_loop(
                    http, registry, settings.router.scrape_interval, timeouts.connect, metrics
                )
            ),
            asyncio.create_task(lag.run()),
            asyncio.create_task(Feeds(registry, metrics).run()),
            *([asyncio.create_task(flush_loop(ledger))] if ledger is not None else []),
            *([asyncio.create_task(store.run())] if store is not None else []),
            *(
                asyncio.create_task(
                    Discovery(
                        engine,
                        registry,
                        settings.router.breaker,
                        metrics,
                        prefix=settings.router.prefix,
                    ).run()
                )
                for engine in settings.engines
                if engine.discover is not None
            ),
        ]
        if tokens is not None:
            await asyncio.to_thread(tokens.warm)  # load tokenizers before the first request
        settle_heap()
        try:
            yield
        finally:
            await cancel_and_wait(loops)
            if store is not None:
                ledger.flush()  # what the last second added
                await store.aclose()
            if isinstance(limiter, RedisLimiter):
                await limiter.close()
            if supervisor is not None:
                await supervisor.stop()
            app.state.hot = None
            await http.close()

    app = GatewayApp(title="tiergate", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.supervisor = supervisor
    app.state.hot = None
    # /v1/models before start-up ends (or without the lifespan): config keys only
    app.state.auth = Authenticator([k.get_secret_value() for k in settings.server.api_keys])
    app.state.created = int(time.time())
    install_error_handlers(app)
    app.include_router(router)
    app.include_router(v1)
    app.include_router(operator)
    return app


def settle_heap() -> None:
    """Once start-up is done: keep the cyclic GC off the hot path (benchmarks/RESULTS.md,
    "Overload again": finding 3).

    What start-up built lives as long as the process, so it is frozen out of the
    collector's sight: a full collection then scans the requests' objects only (28 ms ->
    ~4 ms at 256 streams). Most request objects are freed by reference counting, so the
    young generation's threshold goes from 700 to 5,000 net allocations. Measured over
    8 s at 256 streams: 758 -> 154 young collections, 564 -> ~40 ms of GC in all.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


GC_YOUNG_THRESHOLD = 5000


def uvicorn_config(app: GatewayApp, settings: Settings, **bind: Any) -> Any:
    """The HTTP server for the gateway: uvloop and httptools, no per-request extras
    (access log, proxy-header rewriting, server header): the hot path pays for each."""
    import uvicorn

    return uvicorn.Config(
        app,
        log_level=settings.server.log_level,
        timeout_graceful_shutdown=settings.server.drain_timeout,
        access_log=False,
        proxy_headers=False,
        server_header=False,
        loop="uvloop",
        http=AdmittingProtocol,
        backlog=4096,
        **bind,
    )
