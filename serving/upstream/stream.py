"""Relaying a server-sent event stream from an engine, event by event.

Nothing is buffered beyond one partial event. Errors after the first byte end
the stream with one error event and `data: [DONE]`. A client disconnect closes
the upstream response, which makes vLLM abort the request and free its KV cache.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from serving.errors import GatewayError, UpstreamError, UpstreamTimeout, sse_error_event

_DONE = b"data: [DONE]"


@dataclass
class StreamOutcome:
    """What happened to one stream; read by the caller's metrics hook."""

    started: float
    first_byte: float | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None  # kind of mid-stream error
    disconnected: bool = False
    done: bool = False


def split_events(buffer: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """Add `chunk` to `buffer`; return whole events and the remaining partial one."""
    buffer += chunk
    if b"\n\n" not in buffer:
        return [], buffer
    *events, rest = buffer.split(b"\n\n")
    return events, rest


def usage_of(event: bytes) -> dict[str, Any] | None:
    """The usage object of an event, if it carries one (cheap check before parsing)."""
    if b'"prompt_tokens"' not in event:
        return None
    try:
        usage = json.loads(event.removeprefix(b"data: ")).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def is_usage_only(event: bytes) -> bool:
    return b'"choices":[]' in event


async def prime(response: httpx.Response) -> tuple[bytes, AsyncIterator[bytes]]:
    """Wait for the first body bytes; until then the caller may still fail over."""
    chunks = response.aiter_raw()
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    return first, chunks


async def relay(
    response: httpx.Response,
    first: bytes,
    chunks: AsyncIterator[bytes],
    outcome: StreamOutcome,
    drop_usage_event: bool,
) -> AsyncIterator[bytes]:
    """Yield the engine's SSE events; end with an error event if the engine fails."""
    buffer = b""

    def whole_events(chunk: bytes) -> bytes:
        """The complete events in `chunk` (plus what was buffered), as bytes to send."""
        nonlocal buffer
        events, buffer = split_events(buffer, chunk)
        out = []
        for event in events:
            usage = usage_of(event)
            if usage is not None:
                outcome.usage = usage
                if drop_usage_event and is_usage_only(event):
                    continue  # we asked for it for metrics; the client did not
            if event.startswith(_DONE):
                outcome.done = True
            out.append(event + b"\n\n")
        return b"".join(out)

    try:
        if out := whole_events(first):
            yield out
        async for chunk in chunks:
            if out := whole_events(chunk):
                yield out
        if not outcome.done:
            raise UpstreamError("The engine ended the stream before [DONE].")
    except (GatewayError, httpx.HTTPError) as exc:
        err = _as_gateway_error(exc)
        outcome.error = err.code or type(err).__name__
        yield sse_error_event(err)
    finally:
        await response.aclose()


def _as_gateway_error(exc: Exception) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout("The engine stalled mid-stream.")
    return UpstreamError(f"The engine failed mid-stream: {type(exc).__name__}")


class ProxyStreamResponse(Response):
    """Streams `body` and stops it as soon as the client disconnects.

    Unlike starlette's StreamingResponse under ASGI 2.4, it watches for the
    disconnect message, so a stalled upstream is closed too, and it always closes
    the body iterator (and so the upstream response) on the way out.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[bool], None],
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(content=None, status_code=200, headers=headers)
        self.body_iterator = body
        self.on_close = on_close
        self.headers["cache-control"] = "no-cache"
        self.headers["x-accel-buffering"] = "no"
        if "content-length" in self.headers:
            del self.headers["content-length"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False

        async def watch_disconnect(cancel: anyio.CancelScope) -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected = True
                    cancel.cancel()
                    return

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_disconnect, tg.cancel_scope)
                try:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    async for chunk in self.body_iterator:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except OSError:
                    disconnected = True
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # closes the upstream response
                self.on_close(disconnected)
