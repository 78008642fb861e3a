"""The one shared HTTP client to the engines, and prime-then-stream.

`open` returns only once the engine has answered with a success status, so the
caller can still fail cleanly (or, later, fail over) before a byte reaches the
client. Errors come back as GatewayError subclasses.
"""

from __future__ import annotations

import httpx

from serving.config import TimeoutSettings
from serving.errors import NoEngineReady, UpstreamError, UpstreamTimeout, from_upstream


def build_http_client(
    timeouts: TimeoutSettings, max_connections: int, transport: httpx.AsyncBaseTransport | None
) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        timeout=httpx.Timeout(
            connect=timeouts.connect, read=timeouts.read, write=timeouts.write, pool=timeouts.pool
        ),
        limits=httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        ),
        transport=transport,
    )


class UpstreamClient:
    def __init__(self, http: httpx.AsyncClient) -> None:
        self.http = http

    async def open(self, url: str, path: str, body: bytes) -> httpx.Response:
        """POST `body` and return the streaming response once its status is a success."""
        request = self.http.build_request(
            "POST", url + path, content=body, headers={"content-type": "application/json"}
        )
        try:
            response = await self.http.send(request, stream=True)
        except httpx.ConnectError as exc:
            raise NoEngineReady(f"The engine at {url} is unreachable; retry shortly.") from exc
        except httpx.TimeoutException as exc:
            raise UpstreamTimeout(
                f"The engine did not answer in time ({type(exc).__name__})."
            ) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"The engine failed: {type(exc).__name__}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise from_upstream(response.status_code, body)
        return response
