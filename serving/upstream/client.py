"""The one shared HTTP client to the engines: aiohttp, picked by measurement.

benchmarks/RESULTS.md ("Data plane: the client to the engines") has the side-by-side
figures: per streamed request, httpx's pool scans every connection and its stream
runs through anyio, while aiohttp's StreamReader hands over what the socket gave.

`open` returns only once the engine has answered with a success status, so the
caller can still fail over before a byte reaches the client. Errors come back as
GatewayError subclasses. The pool's keep-alive (4 s) is shorter than uvicorn's (5 s,
which vLLM uses), so a connection the engine is about to close is never reused.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from serving.config import TimeoutSettings
from serving.errors import NoEngineReady, UpstreamError, UpstreamTimeout, from_upstream

_JSON = CIMultiDict({"Content-Type": "application/json"})  # built once, not per request
KEEPALIVE_S = 4.0


class UpstreamClient:
    """One aiohttp session for every request, probe and scrape to the engines."""

    def __init__(self, timeouts: TimeoutSettings, max_connections: int) -> None:
        self.timeouts = timeouts
        self.max_connections = max_connections
        # connect: TCP connect; pool: waiting for a free connection; read: first byte and
        # between chunks (sock_read). No total: a stream may last as long as it streams.
        self.stream_timeout = aiohttp.ClientTimeout(
            total=None,
            connect=timeouts.connect + timeouts.pool,
            sock_connect=timeouts.connect,
            sock_read=timeouts.read,
        )
        self.session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], URL] = {}  # parsed once: URL parsing costs per call

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=self.max_connections,
                limit_per_host=0,
                keepalive_timeout=KEEPALIVE_S,
                ttl_dns_cache=None,
            ),
            timeout=self.stream_timeout,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def open(
        self, url: str, path: str, body: bytes, trace: Mapping[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        """POST `body` and return the response (body unread) once its status is a success.
        `trace`: headers passed on to the engine (x-request-id, traceparent)."""
        assert self.session is not None, "UpstreamClient.start() first"
        target = self._urls.get((url, path))
        if target is None:
            target = self._urls[(url, path)] = URL(url + path)
        try:
            headers = _JSON if not trace else CIMultiDict(_JSON, **trace)
            response = await self.session.post(target, data=body, headers=headers)
        except aiohttp.ClientConnectorError as exc:
            raise NoEngineReady(f"The engine at {url} is unreachable; retry shortly.") from exc
        except TimeoutError as exc:
            raise UpstreamTimeout(
                f"The engine did not answer in time ({type(exc).__name__})."
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The engine failed: {type(exc).__name__}: {exc}") from exc
        if response.status >= 400:
            try:
                data = await response.read()
            except (aiohttp.ClientError, TimeoutError):
                data = b""
            finally:
                response.release()
            raise from_upstream(response.status, data)
        return response

    async def get(self, url: str, timeout: float) -> tuple[int, bytes] | None:
        """A small GET (health, metrics, models); None if it failed in any way."""
        assert self.session is not None, "UpstreamClient.start() first"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
