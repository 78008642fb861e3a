"""Relaying a server-sent event stream from an engine, chunk by chunk.

Bytes go through as the socket gave them; the relay only looks for event boundaries
to find the usage event (for metrics), to hide it when the client did not ask for it,
and to see `[DONE]`. Errors after the first byte end the stream with one error event
and `data: [DONE]`. Closing the upstream response (client gone) makes vLLM abort the
request and free its KV cache.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from serving.errors import GatewayError, UpstreamError, UpstreamTimeout, sse_error_event

_DONE = b"data: [DONE]"
_USAGE = b'"prompt_tokens"'


@dataclass(slots=True)
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
    if _USAGE not in event:
        return None
    try:
        usage = json.loads(event.removeprefix(b"data: ")).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None


def is_usage_only(event: bytes) -> bool:
    return b'"choices":[]' in event or b'"choices": []' in event  # compact (vLLM) or not


async def prime(response: aiohttp.ClientResponse) -> bytes:
    """Wait for the first body bytes; until then the caller may still fail over."""
    return await response.content.readany()


class Relay:
    """Sends the engine's stream on with its usage captured, ending in an error event if
    the engine fails. Chunks pass whole when they hold no usage and no [DONE] (the common
    case: one token event), so the per-chunk cost is two substring searches."""

    __slots__ = ("buffer", "drop_usage", "eof", "first", "outcome", "response")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        outcome: StreamOutcome,
        drop_usage: bool,
        first: bytes,
    ) -> None:
        self.response = response
        self.outcome = outcome
        self.drop_usage = drop_usage
        self.first = first  # what prime() read before the reply was committed
        self.buffer = b""
        self.eof = False

    def _tail(self, chunk: bytes) -> bytes:
        """Chunks near the end of a stream: parse them event by event."""
        events, self.buffer = split_events(self.buffer, chunk)
        out = []
        for event in events:
            usage = usage_of(event)
            if usage is not None:
                self.outcome.usage = usage
                if self.drop_usage and is_usage_only(event):
                    continue  # we asked for it for metrics; the client did not
            if event.startswith(_DONE):
                self.outcome.done = True
            out.append(event + b"\n\n")
        return b"".join(out)

    def feed(self, chunk: bytes) -> bytes:
        if not self.buffer and _USAGE not in chunk and _DONE not in chunk:
            if chunk.endswith(b"\n\n"):
                return chunk  # whole events, nothing to look at
        return self._tail(chunk)

    async def pump(self, send: Callable[[dict], Awaitable[None]]) -> None:
        """Send the stream as ASGI body messages: the hot loop, with no generator between
        the socket read and the client write."""
        try:
            if out := self.feed(self.first):
                await send({"type": "http.response.body", "body": out, "more_body": True})
            read = self.response.content.readany
            while chunk := await read():
                if out := self.feed(chunk):
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            self.eof = True
            if not self.outcome.done:
                raise UpstreamError("The engine ended the stream before [DONE].")
        except (GatewayError, aiohttp.ClientError, TimeoutError) as exc:
            if self.outcome.disconnected:
                return  # we closed it because the client left
            err = as_gateway_error(exc)
            self.outcome.error = err.code or type(err).__name__
            await send(
                {"type": "http.response.body", "body": sse_error_event(err), "more_body": True}
            )
        finally:
            self.close()

    def abort(self) -> None:
        """The client left: close the upstream now; the pending read fails at once."""
        self.outcome.disconnected = True
        self.response.close()

    def close(self) -> None:
        if self.eof and self.outcome.done:
            self.response.release()  # read to the end: the connection is reusable
        else:
            self.response.close()  # mid-stream: vLLM sees the close and aborts


def as_gateway_error(exc: BaseException) -> GatewayError:
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The engine stalled mid-stream.")
    return UpstreamError(f"The engine failed mid-stream: {type(exc).__name__}")
