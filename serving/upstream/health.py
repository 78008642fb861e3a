"""Polls every engine's /health so readiness follows reality, supervised or not, and
scrapes each ready engine's /metrics for its load. Both use the one shared client."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from serving.metrics import GatewayMetrics
from serving.router.load import FULL_PATH, EngineLoad, has_load, others_of, parse_vllm_metrics
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.client import UpstreamClient

log = logging.getLogger("tiergate.health")


async def probe(http: UpstreamClient, url: str, timeout: float) -> bool:
    answer = await http.get(url + "/health", timeout)
    return answer is not None and answer[0] == 200


async def fetch_max_model_len(http: UpstreamClient, ep: Endpoint, timeout: float) -> None:
    answer = await http.get(f"{ep.url}/v1/models", timeout)
    if answer is None or answer[0] != 200:
        return
    try:
        for card in json.loads(answer[1]).get("data", []):
            if card.get("id") == ep.model and card.get("max_model_len"):
                ep.max_model_len = int(card["max_model_len"])
    except (ValueError, AttributeError, TypeError):
        pass


async def check_once(
    http: UpstreamClient,
    registry: EngineRegistry,
    metrics: GatewayMetrics,
    timeout: float,
    draining: Callable[[str], bool] | None = None,
) -> None:
    """`draining(name)`: another process is restarting that engine (serving/workers.py);
    it takes no new requests until that says otherwise."""

    async def one(ep: Endpoint) -> None:
        if not ep.url:
            ep.ready = False
        elif draining is not None and not ep.supervised and draining(ep.name):
            if ep.ready:
                log.info("engine %s is draining for a restart", ep.name)
            ep.ready, ep.state = False, "draining"
        else:
            healthy = await probe(http, ep.url, timeout)
            if ep.state == "removed":  # discovery dropped it while we asked
                return
            # A supervised engine is ready only once its supervisor says it started.
            ready = healthy and (not ep.supervised or ep.state == "ready")
            if ready and not ep.ready:
                log.info("engine %s is ready at %s", ep.name, ep.url)
                # Failures from before it (re)started say nothing about it now; a breaker
                # left open or half-open would refuse a healthy engine.
                ep.breaker.success()
                if ep.max_model_len is None:
                    await fetch_max_model_len(http, ep, timeout)
            elif ep.ready and not ready:
                log.warning("engine %s stopped answering /health", ep.name)
                ep.prefix.forget()  # back or not, what it cached is not to be counted on
            ep.ready = ready
            ep.seen_ready = ep.seen_ready or ready
            if not ep.supervised:
                ep.state = "ready" if healthy else "down"
        metrics.engine_ready.labels(ep.name).set(1 if ep.ready else 0)

    await asyncio.gather(*(one(ep) for ep in registry.endpoints))


async def health_loop(
    http: UpstreamClient,
    registry: EngineRegistry,
    metrics: GatewayMetrics,
    interval: float,
    timeout: float,
    draining: Callable[[str], bool] | None = None,
) -> None:
    """Polls every `interval`, starting one interval from now: the app's start-up has
    made the first check (serving/app.py), so a request never meets an engine unasked."""
    while True:
        await asyncio.sleep(interval)
        await check_once(http, registry, metrics, timeout, draining)


async def scrape(
    http: UpstreamClient, ep: Endpoint, timeout: float, metrics: GatewayMetrics
) -> None:
    """One engine's load from its /metrics: the filtered answer where the engine gives
    one (serving/router/load.py), else the whole text from then on. A failed request
    changes nothing: readiness is the health loop's job, and the last load is kept."""
    if not (ep.ready and ep.url):
        ep.load, ep.others = EngineLoad(), 0.0
    else:
        answer = await http.get(ep.url + ep.scrape_path, timeout)
        # A 5xx is the engine's trouble, not the path's: only an answer that says the
        # path has no load (404, a redirect, a 200 without it) moves to the whole text.
        if answer is not None and answer[0] < 500 and ep.scrape_path != FULL_PATH:
            if answer[0] != 200 or not has_load(answer[1]):
                log.info("engine %s has no load at %s; scraping /metrics", ep.name, ep.scrape_path)
                ep.scrape_path = FULL_PATH
                answer = await http.get(ep.url + FULL_PATH, timeout)
        if answer is not None and answer[0] == 200:
            ep.load = parse_vllm_metrics(answer[1].decode(errors="replace"))
            ep.others = others_of(ep.load, ep.in_flight)
    load = ep.load
    metrics.engine_load(ep.name, load.waiting, load.running, load.kv_usage)


async def scrape_loop(
    http: UpstreamClient,
    registry: EngineRegistry,
    interval: float,
    timeout: float,
    metrics: GatewayMetrics,
) -> None:
    """Keep each ready engine's load (queue, running, KV use) from its /metrics."""
    while True:
        await asyncio.gather(*(scrape(http, ep, timeout, metrics) for ep in registry.endpoints))
        await asyncio.sleep(interval)
