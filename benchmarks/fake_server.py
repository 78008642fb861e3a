"""A FAKE OpenAI-compatible server that answers instantly: for measuring the bench
client's own ceiling (how many requests/s it can drive before it is the bottleneck).

Streams `max_tokens` one-word chunks with no delay, then usage and [DONE]. A bare
ASGI app on uvicorn, so the server costs as little as possible per request.

    python -m benchmarks.fake_server --port 9100
"""

from __future__ import annotations

import argparse
import json

import uvicorn


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/v1/models":
        await _send(send, 200, b'{"object":"list","data":[{"id":"fake","object":"model"}]}')
        return
    if scope["path"] not in ("/v1/completions", "/v1/chat/completions"):
        await _send(send, 404, b'{"error":{"message":"not found","type":"not_found"}}')
        return
    request = json.loads(body or b"{}")
    n = int(request.get("max_tokens") or 16)
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
    await send({"type": "http.response.body", "body": piece * n, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: " + usage + b"\n\ndata: [DONE]\n\n"})


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
    a = p.parse_args(argv)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning", access_log=False, backlog=4096)


if __name__ == "__main__":
    main()
