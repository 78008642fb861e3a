"""Stored Responses (`store: true`): the replica that holds one, and reads and cancels
sent to it. The ids themselves are serving/router/stored.py's."""

from __future__ import annotations

from serving.errors import NoEngineReady, NotFound, from_upstream
from serving.router import stored
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.client import UpstreamClient


def home_of(registry: EngineRegistry, replica: str, what: str, param: str) -> Endpoint:
    """The one replica that holds a stored response (`what` names it in errors)."""
    try:
        ep = registry.get(replica)
    except KeyError:
        raise NotFound(
            f"The replica '{replica}' that stored {what} is gone.", param=param
        ) from None
    if not ep.ready:
        raise NoEngineReady(f"The replica '{replica}' that stored {what} is not ready.")
    return ep


async def read_or_cancel(
    registry: EngineRegistry, upstream: UpstreamClient, response_id: str, cancel: bool
) -> tuple[int, bytes, str]:
    """GET /v1/responses/{id}, or POST .../cancel, answered by the replica the id names:
    (status, body with public ids, replica)."""
    replica, own = stored.split_id(response_id)
    if replica is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    ep = home_of(registry, replica, f"response '{response_id}'", "response_id")
    path = f"/v1/responses/{own}" + ("/cancel" if cancel else "")
    if cancel:
        response = await upstream.open(ep.url or "", path, b"{}")  # raises on 4xx/5xx
        try:
            body, status = await response.read(), response.status
        finally:
            response.release()  # closed instead when not read to its end
    else:
        got = await upstream.get((ep.url or "") + path, upstream.timeouts.read)
        if got is None:
            raise NoEngineReady(f"The replica '{replica}' did not answer.")
        status, body = got
        if status >= 400:
            raise from_upstream(status, body)
    return status, stored.retag(body, replica), replica
