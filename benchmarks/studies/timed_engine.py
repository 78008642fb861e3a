"""A FAKE engine whose timing is known exactly: ground truth for the benchmark tools.

Each request gets its response headers at once (as vLLM sends them), then waits for one
of `--batch` slots (a queue, like an engine's running batch), then streams `max_tokens`
events: the first `--ttft-ms` after it got its slot, the next ones `--itl-ms` apart
(plus a uniform `--jitter-ms`, seeded), every deadline absolute so that no error
accumulates; then usage and [DONE]. Completions and chat, as vLLM shapes them.

    python -m benchmarks.studies.timed_engine --port 9200 --ttft-ms 250 --itl-ms 40 --batch 8

The truths that follow, for C closed-loop clients, N output tokens and B slots:
TTFT = ttft (C <= B), ITL = itl, TPOT = itl, per-request time S = ttft + (N - 1) itl,
output tok/s = min(C, B) N / S.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random

import uvicorn

from benchmarks.studies.fake_server import lifespan, read_all


class Timing:
    def __init__(self, ttft_s: float, itl_s: float, jitter_s: float, batch: int, seed: int):
        self.ttft_s, self.itl_s, self.jitter_s = ttft_s, itl_s, jitter_s
        self.slots = asyncio.Semaphore(batch)
        self.rng = random.Random(seed)


def _event(chat: bool, i: int) -> bytes:
    if chat:
        delta = {"content": f" w{i}"} if i else {"role": "assistant", "content": " w0"}
        data = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
    else:
        data = {"object": "text_completion", "choices": [{"index": 0, "text": f" w{i}"}]}
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def make_app(timing: Timing):
    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_all(receive)
        path = scope["path"]
        if path in ("/health", "/metrics"):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if path not in ("/v1/completions", "/v1/chat/completions"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        request = json.loads(body or b"{}")
        n = int(request.get("max_tokens") or request.get("max_completion_tokens") or 16)
        prompt = request.get("prompt") or json.dumps(request.get("messages"))
        prompt_tokens = max(1, len(str(prompt).split()))
        chat = path.endswith("chat/completions")
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        loop = asyncio.get_running_loop()
        async with timing.slots:
            start = loop.time()
            for i in range(n):
                due = start + timing.ttft_s + i * timing.itl_s
                if timing.jitter_s and i:
                    due += timing.rng.uniform(-timing.jitter_s, timing.jitter_s)
                await asyncio.sleep(max(0.0, due - loop.time()))
                await send(
                    {"type": "http.response.body", "body": _event(chat, i), "more_body": True}
                )
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n}
        usage["total_tokens"] = prompt_tokens + n
        tail = b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n"})

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9200)
    p.add_argument("--ttft-ms", type=float, default=250.0)
    p.add_argument("--itl-ms", type=float, default=40.0)
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    async def serve() -> None:
        timing = Timing(a.ttft_ms / 1e3, a.itl_ms / 1e3, a.jitter_ms / 1e3, a.batch, a.seed)
        config = uvicorn.Config(make_app(timing), host=a.host, port=a.port, log_level="warning")
        await uvicorn.Server(config).serve()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
