"""Thin HTTP handlers: fetch a service from app.state, return its answer.

POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/rerank and
/v1/score are not here: they are the hot path (serving/api/hotpath.py), served before
FastAPI sees the request."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from serving.api.stored import read_or_cancel
from serving.config import Settings
from serving.errors import (
    Conflict,
    Forbidden,
    ModelNotFound,
    NoEngineReady,
    NotFound,
    error_payload,
)
from serving.restart_control import ask_parent
from serving.tenants.auth import OPERATOR_TENANT


def require_api_key(request: Request) -> None:
    """Bearer auth on the OpenAI routes when keys are configured (health and metrics stay open
    for probes and Prometheus); the same check as the hot path's."""
    given = request.headers.getlist("authorization")
    request.state.principal = request.app.state.auth(given[0] if len(given) == 1 else "")


def require_operator(request: Request) -> None:
    """The operator routes (/tiergate/...): a config-file key, or an open gateway; a
    tenant's key is for the OpenAI routes only."""
    require_api_key(request)
    if request.state.principal.tenant != OPERATOR_TENANT:
        raise Forbidden("The /tiergate routes need an operator key (server.api_keys).")


router = APIRouter()
v1 = APIRouter(dependencies=[Depends(require_api_key)])
operator = APIRouter(dependencies=[Depends(require_operator)])


def model_cards(request: Request) -> list[dict]:
    """Every tier's model the caller may use, then the virtual `auto` model."""
    registry = request.app.state.registry
    created = request.app.state.created

    def card(model: str, tier: str | None, max_len: int | None, ready: bool) -> dict:
        return {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "tiergate",
            "tier": tier,
            "max_model_len": max_len,
            "ready": ready,
        }

    principal = request.state.principal
    cards = [
        card(t.model, t.name, t.max_context, any(ep.ready for ep in t.endpoints))
        for t in registry.tiers
        if principal.may_use(t.name)  # a tenant sees the tiers it may use
    ]
    cards.append(
        card(
            registry.auto_model,
            None,
            max((c["max_model_len"] or 0 for c in cards), default=None) or None,
            any(c["ready"] for c in cards),
        )
    )
    return cards


@v1.get("/v1/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": model_cards(request)}


@v1.get("/v1/models/{model:path}")
async def retrieve_model(request: Request, model: str) -> dict:
    """One card (the SDK's `models.retrieve`); ids may hold a '/' (org/name)."""
    for card in model_cards(request):
        if card["id"] == model:
            return card
    raise ModelNotFound(
        f"The model '{model}' does not exist or you do not have access to it.", param="model"
    )


@v1.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> Response:
    """A stored response, from the replica that stores it (its id names it)."""
    proxy = request.app.state.proxy
    status, body, replica = await read_or_cancel(proxy.registry, proxy.upstream, response_id, False)
    return Response(body, status, {"x-tiergate-replica": replica}, "application/json")


@v1.post("/v1/responses/{response_id}/cancel")
async def cancel_response(request: Request, response_id: str) -> Response:
    """Cancel a background response, on the replica that runs it."""
    proxy = request.app.state.proxy
    status, body, replica = await read_or_cancel(proxy.registry, proxy.upstream, response_id, True)
    return Response(body, status, {"x-tiergate-replica": replica}, "application/json")


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    registry = request.app.state.registry
    if registry.any_ready():
        ready_names = [ep.name for ep in registry.endpoints if ep.ready]
        return JSONResponse({"status": "ready", "engines": ready_names})
    return JSONResponse(error_payload(NoEngineReady("No engine is ready.")), status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@operator.get("/tiergate/engines")
async def engines(request: Request) -> dict:
    """Operator view of every engine: state, URL, pid, restarts, load, prefix index."""
    fields = (
        "name",
        "model",
        "url",
        "state",
        "ready",
        "pid",
        "restarts",
        "in_flight",
        "prefill_queued",
        "max_model_len",
        "last_error",
        "scrape_path",
        "kv_events",
        "kv_replay",
    )
    now = time.time()
    return {
        "engines": [
            {f: getattr(ep, f) for f in fields}
            | {"load": dataclasses.asdict(ep.load), "prefix_index": ep.prefix.view(now)}
            for ep in request.app.state.registry.endpoints
        ],
        "time": now,
    }


@operator.post("/tiergate/engines/{name}/restart")
async def restart_engine(request: Request, name: str, drain_timeout: float | None = None) -> dict:
    """A planned restart of one supervised engine, for rolling updates: it takes no new
    requests, its requests in flight finish (up to `drain_timeout`, default
    server.drain_timeout), then it is stopped, started and waited for. Answers once it
    is ready again (or 409 if it did not come back). Under server.workers > 1 the
    parent supervises the engines and does this across every worker."""
    settings, supervisor = request.app.state.settings, request.app.state.supervisor
    try:
        runner = supervisor.runner(name) if supervisor is not None else None
    except KeyError:
        runner = None
    drain = settings.server.drain_timeout if drain_timeout is None else max(0.0, drain_timeout)
    control = getattr(request.app.state, "parent_control", None)
    if runner is None and control is not None and name in request.app.state.parent_supervises:
        return await _restart_by_parent(control, name, drain, settings)
    if runner is None:
        raise NotFound(f"No engine named '{name}' is started by this gateway.", param="name")
    started = time.monotonic()
    try:
        back = await runner.replace(drain, settings.timeouts.engine_start)
    except RuntimeError as exc:
        raise Conflict(f"Cannot restart it now: {exc}.", param="name") from exc
    if not back:
        raise Conflict(f"Engine '{name}' did not come back within timeouts.engine_start.")
    return runner.restarted(started)


async def _restart_by_parent(control: Path, name: str, drain: float, settings: Settings) -> dict:
    """Under server.workers > 1: the parent drains the engine across every worker and
    replaces it (serving/restart_control.py)."""
    timeout = drain + settings.timeouts.health_interval + settings.timeouts.engine_start + 30
    try:
        answer = await ask_parent(control, name, drain, timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise Conflict(f"The gateway's parent process did not answer: {exc}.") from exc
    status = answer.pop("status")
    if status == 200:
        return answer
    if status == 404:
        raise NotFound(answer["message"], param="name")
    raise Conflict(answer["message"], param="name")
