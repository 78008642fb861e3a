"""The hot path: POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings,
/v1/rerank and /v1/score as bare ASGI.

Every request and every streamed token crosses this code, so it skips what FastAPI
and starlette add per request (middleware stack, routing, request objects, a task
group per stream) and keeps every behaviour: admission, auth, body limits, the proxy
service (validation, routing, retries before the first byte), the SSE error rule,
client disconnect -> upstream close (vLLM aborts), metrics. Other routes stay in FastAPI.

Admission refuses, before any upstream work and in microseconds, what the gateway
cannot serve: more requests in flight than `server.max_in_flight`, or an event loop
lagging more than `server.max_loop_lag_ms` (the gateway's own core is saturated).
Under uvicorn it runs in the HTTP parser's callback (serving/api/admission.py), so a
429 does not wait behind the streams' work; under another server, here.
The replicas' own limits (router.spill) are the planner's job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from http import HTTPStatus

from serving.api.access_log import request_id
from serving.api.coalesce import chunk_writer, head_with_body
from serving.api.protocol import Kind
from serving.api.retry_scale import RetryScale, retry_after_scales
from serving.api.serving import PATHS, ProxyService, Streamed, Unary
from serving.errors import (
    GatewayError,
    NoEngineReady,
    PayloadTooLarge,
    Saturated,
    error_payload,
    sse_error_event,
)
from serving.metrics import GatewayMetrics
from serving.router.breaker import RefusalBudget
from serving.tenants.auth import Authenticator

log = logging.getLogger("tiergate.hotpath")

ROUTES: dict[str, Kind] = {path: kind for kind, path in PATHS.items()}
ADMITTED = "tiergate.admitted"  # scope key: admission done, the slot taken
SPREAD = 32  # prebuilt 429s per reason, with retry-after-ms spread
_WANTED = frozenset(
    {
        b"authorization",
        b"content-length",
        b"x-tiergate-tier",
        b"x-session-id",
        b"x-request-id",
        b"traceparent",
    }
)
_JSON = [(b"content-type", b"application/json")]
_SSE = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
_END = {"type": "http.response.body", "body": b"", "more_body": False}
_SHUTDOWN = sse_error_event(
    NoEngineReady("The gateway is shutting down; retry the request.", code="shutting_down")
)


class ClientGone(Exception):
    """The client disconnected before its request was read."""


class LoopLag:
    """How late the event loop wakes a 50 ms timer: the gateway core's saturation."""

    def __init__(self, interval: float = 0.05, report: Callable[[float], None] | None = None):
        self.interval = interval
        self.report = report
        self.lag_ms = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            late = (loop.time() - t0 - self.interval) * 1000
            # fast up, slow down: one late tick counts, recovery needs a few good ones
            self.lag_ms = late if late > self.lag_ms else 0.7 * self.lag_ms + 0.3 * late
            if self.report is not None:
                self.report(self.lag_ms)


class HotPath:
    def __init__(
        self,
        proxy: ProxyService,
        metrics: GatewayMetrics,
        auth: Authenticator,
        max_body_bytes: int,
        max_in_flight: int,
        max_loop_lag_ms: float,
        retry_after_s: int,
        lag: LoopLag | None = None,
        *,
        max_refusals_s: int,
        retry_after_max_scale: int = 1,
    ) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.max_in_flight = max_in_flight
        self.max_loop_lag_ms = max_loop_lag_ms
        self.lag = lag or LoopLag()
        self.in_flight = 0
        # The two ASGI messages of each refusal, built once: SPREAD of them per reason
        # and scale of retry-after (retry_after_scales), their retry-after-ms evenly over
        # 0.5-1.5x it, handed out in turn.
        self.scales = retry_after_scales(retry_after_max_scale)
        self._by_scale = [
            {
                why: [
                    _error_messages(
                        Saturated(
                            f"The gateway is at capacity ({why}); "
                            f"retry after {retry_after_s * scale}s.",
                            retry_after_s * scale,
                            spread=(i + 0.5) / SPREAD,
                        )
                    )
                    for i in range(SPREAD)
                ]
                for why in ("in_flight", "loop_lag")
            }
            for scale in self.scales
        ]
        # ... and each one's status line and headers as HTTP/1.1 bytes, for the parser
        # callback's direct write (serving/api/admission.py) and the front's.
        self.wire_of = {
            id(refusal): (wire_head(refusal[0]), refusal[1]["body"])
            for refusals_of in self._by_scale
            for refusals in refusals_of.values()
            for refusal in refusals
        }
        self.refusal_ms_by_scale = [
            [int(dict(start["headers"])[b"retry-after-ms"]) for start, _ in refusals["in_flight"]]
            for refusals in self._by_scale
        ]
        self._turn = 0
        self.retry_after_s = retry_after_s
        self.retry_scale = RetryScale(self.scales, retry_after_s, max_in_flight)
        self.refusal_budget = RefusalBudget(max_refusals_s)
        self._count_paced = metrics.paced.inc
        self._show_scale = metrics.retry_after_scale.set
        self._show_scale(1)
        self._count_refusal = {
            (why, kind): metrics.refusal_counter(why, path, Saturated.status)
            for why in self._by_scale[0]
            for kind, path in PATHS.items()
        }

    def admit(self, kind: Kind, counted: bool = False) -> list[dict] | None:
        """Take a slot (None), or count, log and return the 429's ASGI messages.
        `counted`: the request's slot was counted before it got here (serving/front
        holds max_in_flight), so only the loop-lag check is this process's to make."""
        why = self.full(counted)
        if why is None:
            self.in_flight += 1
            return None
        return self.refuse(why, kind)

    def full(self, counted: bool = False) -> str | None:
        """Why a request arriving now would be refused, or None: the admission test alone."""
        if not counted and self.max_in_flight and self.in_flight >= self.max_in_flight:
            return "in_flight"
        if self.max_loop_lag_ms and self.lag.lag_ms > self.max_loop_lag_ms:
            return "loop_lag"
        return None

    def refuse(self, why: str, kind: Kind) -> list[dict]:
        """Count and log a refusal for `why`, and return the next prebuilt 429."""
        self._count_refusal[why, kind]()
        self.proxy.access.write(path=PATHS[kind], status=Saturated.status, error=Saturated.code)
        if self.retry_scale.refused(time.monotonic()):
            self._show_scale(self.scales[self.retry_scale.at])
        self._turn = (self._turn + 7) % SPREAD  # 7 is prime to SPREAD: every one in turn
        return self._by_scale[self.retry_scale.at][why][self._turn]

    def pace_for(self, now: float) -> float | None:
        """After a refusal: None within server.max_refusals_s; past it, how long the
        refused connection should go unread (the Retry-After-Ms it was just given), so
        that clients which re-send at once wait as the SDK's clients do."""
        if self.refusal_budget.take(now):
            return None
        self._count_paced()
        return self.refusal_ms_by_scale[self.retry_scale.at][self._turn] / 1000

    def take(self) -> None:
        """A slot with no checks: a request the front counted that cannot be refused from
        the parser callback (its client's socket is not writable)."""
        self.in_flight += 1

    def refusal_messages(self, why: str) -> list[list[list[dict]]]:
        """The prebuilt 429s for `why`, per scale (the front sends the same bytes)."""
        return [refusals[why] for refusals in self._by_scale]

    async def _read(self, receive, headers: dict[str, str]) -> bytes:
        limit = self.max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"Request body of {declared} bytes exceeds the {limit}-byte limit."
            )
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"Request body exceeds the {limit}-byte limit.")
            chunks.append(chunk)
            if not message.get("more_body"):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def __call__(self, kind: Kind, scope, receive, send) -> None:
        if not scope.get(ADMITTED):
            refusal = self.admit(kind)
            if refusal is not None:
                for message in refusal:
                    await send(message)
                return
        rid = None
        try:
            headers, auths = {}, 0
            for k, v in scope["headers"]:
                if k in _WANTED:
                    headers[k.decode()] = v.decode("latin-1")
                    auths += k == b"authorization"
            headers["x-request-id"] = rid = request_id(headers.get("x-request-id"))
            try:
                # two Authorization headers are ambiguous (proxies may keep either): refused
                principal = self.auth("" if auths > 1 else headers.get("authorization", ""))
                body = await self._read(receive, headers)
            except GatewayError as exc:  # refused before the proxy: counted and logged here
                self.metrics.request_done("unknown", PATHS[kind], exc.status)
                self.proxy.access.write(
                    request_id=rid, path=PATHS[kind], status=exc.status, error=exc.code
                )
                raise
            reply = await self.proxy.handle(kind, body, headers, principal)
            if isinstance(reply, Unary):
                await _send_unary(send, reply)
            else:
                await _send_stream(send, receive, reply)
        except GatewayError as exc:
            await _send_error(send, exc, rid)
        except ClientGone:
            pass
        except Exception as exc:  # a bug: answer in the OpenAI shape, keep serving
            log.exception("unexpected error on %s", scope["path"])
            await _send_error(send, GatewayError(f"internal error: {type(exc).__name__}"), rid)
        finally:
            self.in_flight -= 1


def wire_head(start: dict) -> bytes:
    """An http.response.start message as HTTP/1.1: status line and headers, each line
    ended, the blank line not yet."""
    status = start["status"]
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, HTTPStatus(status).phrase.encode())]
    lines += [k + b": " + v + b"\r\n" for k, v in start["headers"]]
    return b"".join(lines)


def _extra(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in headers.items()]


def _error_messages(exc: GatewayError, rid: str | None = None) -> list[dict]:
    body = json.dumps(error_payload(exc)).encode()
    length = [(b"content-length", str(len(body)).encode())]
    if rid:
        length.append((b"x-request-id", rid.encode()))
    headers = _JSON + length + _extra(exc.headers or {})
    return [
        {"type": "http.response.start", "status": exc.status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


async def _send_error(send, exc: GatewayError, rid: str | None = None) -> None:
    with head_with_body(send):
        for message in _error_messages(exc, rid):
            await send(message)


async def _send_unary(send, reply: Unary) -> None:
    length = [(b"content-length", str(len(reply.body)).encode())]
    headers = _JSON + length + _extra(reply.headers)
    with head_with_body(send):
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})


async def _send_stream(send, receive, reply: Streamed) -> None:
    """Relay the stream; a disconnect closes the upstream even while it is silent."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not reply.relay.ended:  # uvicorn says "disconnect" once a response is complete
            reply.relay.abort()

    watcher = asyncio.ensure_future(watch())
    relay = reply.relay
    try:
        headers = _SSE + _extra(reply.headers)
        with head_with_body(send):  # the head leaves with the first event, already read
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            if message := relay.opening():
                await send(message)
        await relay.pump(send, chunk_writer(send))
        watcher.cancel()
        if not relay.ended:
            await send(_END)
    except asyncio.CancelledError:
        # The server is shutting down and the drain time is over: end the stream the
        # way the SSE error rule says, rather than cutting it mid-event.
        if not relay.outcome.disconnected and not relay.ended:
            reply.relay.outcome.error = "shutting_down"
            await send({"type": "http.response.body", "body": _SHUTDOWN, "more_body": False})
        raise
    finally:
        watcher.cancel()
        reply.relay.close()
        reply.finish()
