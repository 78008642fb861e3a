"""Relaying a server-sent event stream from an engine, chunk by chunk.

Bytes go through as the socket gave them; the relay only looks for event boundaries
to find the usage event (for metrics), to hide it when the client did not ask for it,
and to see `[DONE]`. Errors after the first byte end the stream with one error event
and `data: [DONE]`; so does a request the engine aborted (vLLM ends it with
`finish_reason: "abort"`, usage and its own `[DONE]`, which would read as a normal
end). Closing the upstream response (client gone) makes vLLM abort the request and free
its KV cache.

Each chunk is written from the engine socket's read callback: under uvicorn a chunk
before the last goes straight to the client's transport (`write`, from
serving/api/coalesce.py); otherwise the ASGI `send` is run there to its end, which it
reaches at once unless the client's socket is full (then a task finishes it, the
engine's socket is paused, and later chunks wait in order). The
chunk that carries `[DONE]` ends the response (`more_body: False`), so the last event
and the body's end leave in one write.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from serving.errors import GatewayError, UpstreamError, sse_error_event
from serving.router.stored import retag
from serving.upstream.wire import Response

_DONE = b"data: [DONE]"
# vLLM's end of a request it aborted (the engine stopping mid-answer: a restart past its
# drain time, a shutdown). Not an OpenAI finish_reason: a cut, told as one. vLLM writes
# JSON compact; inside a content string the quotes would be escaped, so no false match.
ABORTED = b'"finish_reason":"abort"'
_USAGE = b'"prompt_tokens"'
_RESPONSE_USAGE = b'"input_tokens"'
# The Responses API's stream has no [DONE]: one of these events is its last.
_DELTA = b"event: response.output_text.delta\n"
# (An event's lines end in a newline; one inside a JSON string is escaped, so no anchor.)
_RESPONSE_END = re.compile(rb"event: (response\.(?:completed|incomplete|failed)|error)\n")


@dataclass(slots=True)
class StreamOutcome:
    """What happened to one stream; read by the caller's metrics hook."""

    started: float
    first_byte: float | None = None
    usage: dict[str, Any] | None = None
    error: str | None = None  # kind of mid-stream error
    disconnected: bool = False
    done: bool = False


def engine_aborted() -> UpstreamError:
    return UpstreamError(
        "The engine stopped this request before it finished (vLLM aborted it: the engine "
        "is restarting or shutting down). Retry it.",
        code="engine_aborted",
    )


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


def response_usage(body: bytes) -> dict[str, Any] | None:
    """A Responses API object's usage (the unary body, or a terminal event's
    `response`), in the chat names the metrics and the ledger count."""
    if _RESPONSE_USAGE not in body:
        return None
    try:
        data = json.loads(body)
        usage = data.get("usage") if "usage" in data else data["response"].get("usage")
        return {
            "prompt_tokens": int(usage["input_tokens"]),
            "completion_tokens": int(usage["output_tokens"]),
            "total_tokens": int(usage["input_tokens"]) + int(usage["output_tokens"]),
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_usage_only(event: bytes) -> bool:
    return b'"choices":[]' in event or b'"choices": []' in event  # compact (vLLM) or not


async def prime(response: Response) -> bytes:
    """Wait for the first body bytes; until then the caller may still fail over."""
    return await response.first()


def _body(out: bytes, more: bool) -> dict:
    return {"type": "http.response.body", "body": out, "more_body": more}


class Relay:
    """Sends the engine's stream on with its usage captured, ending in an error event if
    the engine fails or aborts the request. Chunks pass whole when they hold no usage and
    no [DONE] (the common case: one token event), so the per-chunk cost is two substring
    searches and keeping the chunk (the last one before the end is searched for an
    abort once)."""

    __slots__ = (
        "buffer",
        "drop_usage",
        "ended",
        "failed",
        "first",
        "last",
        "outcome",
        "pending",
        "response",
        "resumer",
        "send",
        "write",
    )

    def __init__(
        self,
        response: Response,
        outcome: StreamOutcome,
        drop_usage: bool,
        first: bytes,
    ) -> None:
        self.response = response
        self.outcome = outcome
        self.drop_usage = drop_usage
        self.first = first  # what prime() read before the reply was committed
        self.buffer = b""
        self.last = b""  # the last chunk that passed whole
        self.send: Callable[[dict], Awaitable[None]] | None = None
        # Writes a body chunk that is not the last straight to the client, or says no
        # (False) and the chunk goes by `send` (serving/api/coalesce.py: chunk_writer).
        self.write: Callable[[bytes], bool] | None = None
        self.pending: list[bytes] | None = None  # chunks held while a send is suspended
        self.resumer: asyncio.Task | None = None
        self.failed: BaseException | None = None  # raised by send in the read callback
        self.ended = False  # the client's response is complete (sent with [DONE])

    def _tail(self, chunk: bytes) -> bytes:
        """Chunks near the end of a stream: parse them event by event."""
        events, self.buffer = split_events(self.buffer, chunk)
        # Where an aborted request's end is: the last chunk that passed whole (feed keeps
        # it unsearched), else one of these events. What follows it is not an end.
        if ABORTED in self.last:
            cut: int | None = 0
        else:
            cut = next((i for i, event in enumerate(events) if ABORTED in event), None)
        self.last = b""
        out = []
        for event in events[:cut]:
            usage = usage_of(event)
            if usage is not None:
                self.outcome.usage = usage
                if self.drop_usage and is_usage_only(event):
                    continue  # we asked for it for metrics; the client did not
            if event.startswith(_DONE):
                self.outcome.done = True
            out.append(event + b"\n\n")
        if cut is not None:
            self.outcome.error = "engine_aborted"
            self.outcome.done = True
            out.append(sse_error_event(engine_aborted()))
            self._usage_in(events[cut:])  # the tokens it did send are counted
        return b"".join(out)

    def after_end(self, chunk: bytes) -> None:
        """Bytes the engine sends after the client's response has ended: only an aborted
        request's usage is read from them (the tokens it did send are counted)."""
        if self.outcome.error == "engine_aborted" and self.outcome.usage is None:
            events, self.buffer = split_events(self.buffer, chunk)
            self._usage_in(events)

    def _usage_in(self, events: list[bytes]) -> None:
        for event in events:
            if (usage := usage_of(event)) is not None:
                self.outcome.usage = usage
                return

    def feed(self, chunk: bytes) -> bytes:
        if not self.buffer and _USAGE not in chunk and _DONE not in chunk:
            if chunk.endswith(b"\n\n"):
                self.last = chunk  # kept, not searched: _tail looks for an abort in it
                return chunk  # whole events, nothing to look at
        return self._tail(chunk)

    def message(self, chunk: bytes) -> dict | None:
        """The ASGI body message that relays `chunk`, the last one if it holds [DONE]."""
        if self.ended or not (out := self.feed(chunk)):
            return None
        self.ended = self.outcome.done
        return _body(out, not self.ended)

    def opening(self) -> dict | None:
        """The message for what prime() read (sent once, with the response's head)."""
        first, self.first = self.first, b""
        return self.message(first) if first else None

    def _chunk(self, chunk: bytes) -> None:
        """The sink: called from the engine socket's read callback."""
        if self.pending is not None:
            self.pending.append(chunk)
            return
        if self.failed is not None:
            return
        try:
            if self.ended:
                self.after_end(chunk)
                return
            if not (out := self.feed(chunk)):
                return
            self.ended = self.outcome.done
            if not self.ended and self.write is not None and self.write(out):
                return  # the usual case: one token event, written
            coro = self.send(_body(out, not self.ended))
            try:
                waiting = coro.send(None)
            except StopIteration:
                return  # written
            self.pending = []
            self.response.pause()
            self.resumer = asyncio.ensure_future(self._finish(coro, waiting))
        except Exception as exc:  # the client side failed: stop reading the engine
            self.failed = exc
            self.response.close()

    async def _finish(self, coro: Coroutine, waiting: Any) -> None:
        """End a send that suspended, then pass on what came meanwhile, in order."""
        try:
            while True:
                if waiting is None:
                    await asyncio.sleep(0)
                else:
                    await asyncio.wait([waiting])
                try:
                    waiting = coro.send(None)
                except StopIteration:
                    break
        except Exception as exc:
            self.failed = exc
            self.response.close()
        held, self.pending = self.pending or [], None
        for chunk in held:
            self._chunk(chunk)
        if self.pending is None:
            self.response.resume()

    async def pump(
        self,
        send: Callable[[dict], Awaitable[None]],
        write: Callable[[bytes], bool] | None = None,
    ) -> None:
        """Send the stream as ASGI body messages, each from the engine socket's read
        callback, with no task wake-up between the socket read and the client write.
        With `write`, the chunks before the last go through it where it can take them."""
        self.send = send
        self.write = write
        try:
            if message := self.opening():
                await send(message)
            try:
                await self.response.stream(self._chunk)
            finally:
                while self.resumer is not None and not self.resumer.done():
                    await self.resumer  # a suspended send and what it held back
            if self.failed is not None:
                raise self.failed
            if not self.outcome.done:
                raise UpstreamError("The engine ended the stream before its last event.")
        except GatewayError as exc:  # the engine client raises nothing else
            if self.outcome.disconnected:
                return  # we closed it because the client left
            if self.failed is not None:  # we closed it because the client's side failed
                raise self.failed from exc
            if self.ended:
                return  # the client has every event; the engine's connection is closed
            self.outcome.error = exc.code or type(exc).__name__
            self.ended = True  # the error event and [DONE] end the response
            await send(
                {"type": "http.response.body", "body": sse_error_event(exc), "more_body": False}
            )
        finally:
            self.close()

    def abort(self) -> None:
        """The client left: close the upstream now; the pending read fails at once."""
        self.outcome.disconnected = True
        self.response.close()

    def close(self) -> None:
        if self.resumer is not None and not self.resumer.done():
            self.resumer.cancel()
        self.response.release()  # kept only if read to the end, else closed (vLLM aborts)


class ResponsesRelay(Relay):
    """The Responses API's stream (`event:` and `data:` lines, no [DONE]): it ends with
    `response.completed`, `.incomplete` or `.failed`, whose response carries the usage,
    or with the engine's own `error` event, which passes as it came."""

    __slots__ = ("replica",)

    def __init__(self, *args: Any, replica: str = "") -> None:
        super().__init__(*args)
        self.replica = replica  # response ids in the events name it (api/stored.py)

    def feed(self, chunk: bytes) -> bytes:
        if not self.buffer and chunk.endswith(b"\n\n"):
            if chunk.startswith(_DELTA) and chunk.find(b"\n\n") == len(chunk) - 2:
                return chunk  # one token's event, whole: the usual chunk
            if _RESPONSE_END.search(chunk) is None:
                return retag(chunk, self.replica)  # whole events, none of them the last
        return retag(self._events(chunk), self.replica)

    def _events(self, chunk: bytes) -> bytes:
        events, self.buffer = split_events(self.buffer, chunk)
        for event in events:
            end = _RESPONSE_END.search(event)
            if end is None:
                continue
            if end[1] == b"error":
                self.outcome.error = "engine_error"
            else:
                data = event[event.find(b"data: ") + 6 :]
                self.outcome.usage = response_usage(data) or self.outcome.usage
            self.outcome.done = True
        return b"".join(event + b"\n\n" for event in events)
