"""A yardstick relay, not a product: the least a Python proxy can do per streamed request
(bare ASGI on uvicorn with uvloop + httptools, one shared aiohttp session, bytes passed
through untouched). benchmarks/studies/gateway_capacity.py runs it in the same sweep as tiergate,
so that tiergate's figures read as a ratio that means something on any machine.

    python -m benchmarks.studies.yardstick --port 9200 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse

import aiohttp

from benchmarks.studies.fake_server import read_all, run_bare


def build(upstream: str):
    session: aiohttp.ClientSession | None = None

    async def app(scope, receive, send) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    session = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
                    )
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        body = await read_all(receive)
        async with session.post(
            upstream + scope["path"], data=body, headers={"content-type": "application/json"}
        ) as r:
            await send(
                {
                    "type": "http.response.start",
                    "status": r.status,
                    "headers": [(b"content-type", r.content_type.encode())],
                }
            )
            async for chunk in r.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=9200)
    p.add_argument("--upstream", required=True)
    a = p.parse_args(argv)
    run_bare(build(a.upstream.rstrip("/")), "127.0.0.1", a.port)


if __name__ == "__main__":
    main()
