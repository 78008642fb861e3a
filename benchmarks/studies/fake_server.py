"""A FAKE OpenAI-compatible server: for measuring the bench client's own ceiling, and a
gateway's relay capacity (benchmarks/studies/gateway_capacity.py).

Streams `max_tokens` one-word chunks (or `--events`), with no delay or `--gap-ms`
between them like decode steps, then usage and [DONE]. Answers /health and an empty
/metrics so a gateway treats it as a ready engine. A bare ASGI app on uvicorn, so the
server costs as little as possible per request.

    python -m benchmarks.studies.fake_server --port 9100 [--events 16 --gap-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json

import uvicorn

EVENTS: int | None = None  # fixed events per stream (else max_tokens)
GAP_S = 0.0  # between events


async def lifespan(receive, send) -> None:
    """Answer an ASGI lifespan scope: nothing to start or stop."""
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = await read_all(receive)
    if scope["path"] == "/health":
        await _send(send, 200, b"")
        return
    if scope["path"] == "/metrics":
        await _send(send, 200, b"")
        return
    if scope["path"] == "/v1/models":
        await _send(send, 200, b'{"object":"list","data":[{"id":"fake","object":"model"}]}')
        return
    if scope["path"] not in ("/v1/completions", "/v1/chat/completions"):
        await _send(send, 404, b'{"error":{"message":"not found","type":"not_found"}}')
        return
    request = json.loads(body or b"{}")
    n = EVENTS or int(request.get("max_tokens") or 16)
    chat = scope["path"].endswith("chat/completions")
    piece = (
        b'data: {"choices":[{"index":0,"delta":{"content":" x"}}]}\n\n'
        if chat
        else b'data: {"choices":[{"index":0,"text":" x"}]}\n\n'
    )
    usage = json.dumps(
        {
            "choices": [],
            "usage": {"prompt_tokens": 16, "completion_tokens": n, "total_tokens": 16 + n},
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    if GAP_S:
        for _ in range(n):
            await asyncio.sleep(GAP_S)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
    else:
        await send({"type": "http.response.body", "body": piece * n, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: " + usage + b"\n\ndata: [DONE]\n\n"})


async def read_all(receive) -> bytes:
    """A request's whole body from ASGI receive()."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def _send(send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--events", type=int, help="events per stream (default: max_tokens)")
    p.add_argument("--gap-ms", type=float, default=0.0, help="between events")
    a = p.parse_args(argv)
    global EVENTS, GAP_S
    EVENTS, GAP_S = a.events, a.gap_ms / 1000
    run_bare(app, a.host, a.port)


def run_bare(asgi, host: str, port: int) -> None:
    """Serve a bare ASGI app as cheaply as uvicorn can (uvloop, httptools, no access log)."""
    uvicorn.run(
        asgi,
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
        backlog=4096,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
