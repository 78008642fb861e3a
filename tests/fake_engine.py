"""A FAKE upstream engine, for what the real vLLM cannot be made to do on demand.

It speaks just enough of vLLM's HTTP API to misbehave: the request's `model`
picks the behaviour (stall, cut the stream, answer garbage, fail with 500).
It runs as a real HTTP server on loopback, so the gateway's real timeouts apply.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from serving.app import create_app, uvicorn_config
from serving.config import Settings
from tests.utils import free_port

# A port nothing listens on (connections are refused at once): an engine that is gone.
GONE_URL = "http://127.0.0.1:1"

BEHAVIOURS = (
    "ok",
    "stall",
    "stall-stream",
    "cut-stream",
    "garbage",
    "error-500",
    "no-done",
    "slow",
    "stall-body",
    "drip",
    "trickle",
    "late-end",
    "error-event",
    "abort",
)


def _chunk(text: str) -> bytes:
    event = {
        "id": "fake",
        "object": "chat.completion.chunk",
        "model": "fake",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _chat(request: Request) -> Response:
    body = await request.json()
    mode = request.app.state.force or body["model"]
    request.app.state.seen.append(mode)
    request.app.state.headers.append(dict(request.headers))
    if mode == "stall":
        await asyncio.sleep(30)
    if mode == "slow":
        await asyncio.sleep(1.0)
    if mode == "garbage":
        return PlainTextResponse("<html>proxy error</html>", status_code=502)
    if mode == "error-500":
        return JSONResponse(
            {
                "error": {
                    "message": "engine exploded",
                    "type": "InternalError",
                    "param": None,
                    "code": 500,
                }
            },
            status_code=500,
        )
    if mode == "stall-body":  # headers, then nothing: stalls a non-streamed read

        async def half_json():
            yield b'{"id": "fake", '
            await asyncio.sleep(30)

        return StreamingResponse(half_json(), media_type="application/json")
    if not body.get("stream"):
        return JSONResponse(  # compact JSON, as vLLM's (starlette's) is
            {
                "id": "fake",
                "object": "chat.completion",
                "model": mode,
                "choices": [
                    {
                        "index": 0,
                        # vLLM's answer to a request it aborted while stopping
                        "finish_reason": "abort" if mode == "abort" else "stop",
                        "message": {"role": "assistant", "content": "ok"},
                    }
                ],
                "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
            }
        )

    if mode in ("drip", "trickle"):  # token events like decode steps, usage, [DONE]
        count, gap = (20, 0.01) if mode == "drip" else (60, 0.1)  # trickle: 6 s

        async def drip():
            for _ in range(count):
                await asyncio.sleep(gap)
                yield _chunk("tok")
            usage = {"prompt_tokens": 3, "completion_tokens": count, "total_tokens": 3 + count}
            yield b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(drip(), media_type="text/event-stream")

    async def events():
        yield _chunk("one")
        yield _chunk("two")
        if mode == "stall-stream":
            await asyncio.sleep(30)
        if mode == "cut-stream":
            raise RuntimeError("fake engine drops the connection")
        if mode == "abort":  # vLLM aborting it as the engine stops: a normal-looking end
            end = {"choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "abort"}]}
            usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
            for event in (end, {"choices": [], "usage": usage}):
                yield b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
        if mode != "no-done":
            yield b"data: [DONE]\n\n"
        if mode == "late-end":  # the body's end comes 0.2 s after [DONE]
            await asyncio.sleep(0.2)

    return StreamingResponse(events(), media_type="text/event-stream")


def _response_event(kind: str, **data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


async def _responses(request: Request) -> Response:
    """The Responses API as vLLM streams it: `event:` lines, no [DONE], the usage in the
    last event's response. Modes as for chat, plus `error-event` (the engine's own)."""
    body = await request.json()
    mode = request.app.state.force or body["model"]
    request.app.state.seen.append(mode)
    usage = {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}
    done = {"id": "resp_fake", "object": "response", "status": "completed", "usage": usage}
    if not body.get("stream"):
        return JSONResponse({**done, "output": [{"type": "message", "content": []}]})

    async def events():
        yield _response_event("response.created", response={**done, "usage": None})
        yield _response_event("response.output_text.delta", delta="one")
        if mode == "stall-stream":
            await asyncio.sleep(30)
        if mode == "cut-stream":
            raise RuntimeError("fake engine drops the connection")
        if mode == "error-event":
            yield _response_event("error", code="fake", message="the engine failed")
        elif mode != "no-done":
            yield _response_event("response.completed", response=done)

    return StreamingResponse(events(), media_type="text/event-stream")


async def _embeddings(request: Request) -> Response:
    """A FAKE embedding engine: 4-dimension vectors from each input's length, usage as
    3 tokens an input; `error-500` fails as an engine would."""
    body = await request.json()
    mode = request.app.state.force or body["model"]
    request.app.state.seen.append(mode)
    request.app.state.headers.append(dict(request.headers))
    if mode == "error-500":
        error = {"message": "engine exploded", "type": "InternalError", "param": None}
        return JSONResponse({"error": {**error, "code": 500}}, status_code=500)
    given = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for i, text in enumerate(given):
        vector = [float(len(str(text))), 1.0, 0.0, -1.0]
        if body.get("encoding_format") == "base64":
            packed = base64.b64encode(struct.pack("<4f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": packed})
        else:
            data.append({"object": "embedding", "index": i, "embedding": vector})
    usage = {"prompt_tokens": 3 * len(given), "total_tokens": 3 * len(given)}
    return JSONResponse({"object": "list", "model": body["model"], "data": data, "usage": usage})


async def _health(_: Request) -> Response:
    return PlainTextResponse("")


async def _filtered_metrics(request: Request) -> Response:
    """vLLM's /metrics/ honours prometheus_client's `name[]` (serving/router/load.py);
    `empty` stands for a registry that filters everything out (multiprocess mode)."""
    request.app.state.scraped.append(str(request.url.path) + "?" + request.url.query)
    mode = request.app.state.filtered
    if mode in ("none", "error"):
        status = 404 if mode == "none" else 500
        return PlainTextResponse("Not Found" if status == 404 else "boom", status_code=status)
    return await _metrics(request) if mode == "load" else PlainTextResponse("")


async def _metrics(request: Request) -> Response:
    if request.url.path == "/metrics":
        request.app.state.scraped.append("/metrics")
    waiting = request.app.state.waiting
    return PlainTextResponse(
        f'vllm:num_requests_waiting{{model_name="fake"}} {waiting}\n'
        'vllm:num_requests_running{model_name="fake"} 0.0\n'
    )


class FakeEngine:
    """`force` fixes the behaviour whatever the model; `waiting` is what /metrics reports."""

    def __init__(self, force: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port or free_port()
        self.url = f"http://{host}:{self.port}"
        app = Starlette(
            routes=[
                Route("/health", _health),
                Route("/metrics", _metrics),
                Route("/metrics/", _filtered_metrics),
                Route("/v1/chat/completions", _chat, methods=["POST"]),
                Route("/v1/responses", _responses, methods=["POST"]),
                Route("/v1/embeddings", _embeddings, methods=["POST"]),
            ]
        )
        app.state.seen = []
        app.state.headers = []
        app.state.force = force
        app.state.waiting = 0.0
        app.state.filtered = "none"  # /metrics/?name[]=: none (404), error (500), empty, load
        app.state.scraped = []  # the /metrics paths asked, with their query
        self.app = app
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=host,
                port=self.port,
                log_level="error",
                lifespan="off",
                timeout_graceful_shutdown=1,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeEngine:
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@contextlib.asynccontextmanager
async def in_process_gateway(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real gateway app (lifespan included) with a client bound to it in-process.

    Waits until every engine whose URL answers is ready; the client's `app`
    attribute is the app. Checks on exit that no request was left in flight.
    """
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        registry = app.state.registry
        for _ in range(100):
            await asyncio.sleep(0.05)
            if all(ep.ready for ep in registry.endpoints if not ep.url.endswith(":1")):
                break
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            client.app = app
            yield client
        assert all(ep.in_flight == 0 for ep in registry.endpoints)
        assert all(ep.prefill_queued == 0 for ep in registry.endpoints)


@contextlib.asynccontextmanager
async def served(settings: Settings, http: type | None = None) -> AsyncIterator[tuple[Any, str]]:
    """The gateway on a real uvicorn server, configured as `tiergate serve` configures it
    (uvloop, the admitting HTTP protocol, or `http`); yields (app, url) once ready."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn_config(app, settings, host="127.0.0.1", port=port)
    if http is not None:
        config.http = http
    config.timeout_graceful_shutdown = 2
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(url + "/ready")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
        yield app, url
    finally:
        server.should_exit = True
        await serving
