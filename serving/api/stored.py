"""Stored Responses (`store: true`): the replica that holds one, and reads and cancels
sent to it. The ids themselves are serving/router/stored.py's."""

from __future__ import annotations

from serving.errors import NoEngineReady, NotFound, UpstreamStatusError, from_upstream
from serving.router import stored
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.client import UpstreamClient

# vLLM keeps a stored response in the engine process's memory only: once that process
# has exited (restarting, failed, stopped), the response is gone for good, and holding
# the request for the replica's return would end in a 404 anyway. (A replica that
# discovery removed is no longer in the registry at all.)
_GONE_STATES = frozenset({"down", "starting", "failed", "stopped"})
_IN_MEMORY = "vLLM keeps stored responses in the engine's memory only"


def _gone(what: str, replica: str, why: str, param: str) -> NotFound:
    return NotFound(
        f"The replica '{replica}' that stored {what} {why}, so it is gone ({_IN_MEMORY}).",
        param=param,
    )


def home_of(
    registry: EngineRegistry, replica: str, what: str, param: str, reading: bool = False
) -> Endpoint:
    """The one replica that holds a stored response (`what` names it in errors). A
    replica draining for a restart is still alive: it answers reads, not new turns. An
    external engine that fails its health check may be alive too: a 503, not a 404."""
    try:
        ep = registry.get(replica)
    except KeyError:
        raise _gone(what, replica, "is not in this fleet", param) from None
    if ep.ready or (reading and ep.state == "draining"):
        return ep
    if ep.supervised and ep.state in _GONE_STATES:
        raise _gone(what, replica, f"has stopped since (it is {ep.state})", param)
    if ep.state == "draining":  # alive, but a new turn would hold up its restart
        raise NoEngineReady(
            f"The replica '{replica}' that stored {what} is draining for a restart: it "
            f"takes no new turns, and once it restarts the response is gone ({_IN_MEMORY}). "
            "Send the conversation again as input, without it.",
            param=param,
        )
    raise NoEngineReady(f"The replica '{replica}' that stored {what} is not ready.")


def missing(response_id: str, replica: str, param: str) -> NotFound:
    """The engine's 404 for a stored response, in the client's terms (its public id)."""
    return NotFound(
        f"Response '{response_id}' not found on the replica '{replica}' that stored it (it "
        f"may have restarted since: {_IN_MEMORY}).",
        param=param,
    )


async def read_or_cancel(
    registry: EngineRegistry, upstream: UpstreamClient, response_id: str, cancel: bool
) -> tuple[int, bytes, str]:
    """GET /v1/responses/{id}, or POST .../cancel, answered by the replica the id names:
    (status, body with public ids, replica)."""
    replica, own = stored.split_id(response_id)
    if replica is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param="response_id")
    what = f"response '{response_id}'"
    ep = home_of(registry, replica, what, "response_id", reading=True)
    path = f"/v1/responses/{own}" + ("/cancel" if cancel else "")
    try:
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
    except UpstreamStatusError as exc:
        if exc.status == 404:  # the engine names its own id: say it with the client's
            raise missing(response_id, replica, "response_id") from None
        raise
    return status, stored.retag(body, replica), replica
