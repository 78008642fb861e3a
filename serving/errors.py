"""Errors, and the one place that turns them into OpenAI-shaped responses.

Hierarchy:

    GatewayError                      anything we answer with an error envelope
    ├── InvalidRequest          400   malformed JSON, wrong field type, bad value
    ├── ModelNotFound           404   `model` names nothing we serve
    ├── PayloadTooLarge         413   body over server.max_body_bytes
    ├── NotFound / Conflict     404 / 409   admin routes: no such engine, or not now
    ├── NoEngineReady           503   no ready engine serves the model
    ├── Saturated               429   every replica of every eligible tier is full
    └── UpstreamError           502   the engine failed (connect error, bad answer)
        ├── UpstreamTimeout     504   no first byte / next chunk within timeouts.read
        └── UpstreamStatusError  *    the engine answered an error; its status is kept

Every response body is {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
import random
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class GatewayError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if headers is not None:
            self.headers = headers


class InvalidRequest(GatewayError):
    status, type = 400, "invalid_request_error"


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class Forbidden(GatewayError):
    status, type, code = 403, "invalid_request_error", "forbidden"


class InsufficientQuota(GatewayError):
    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class ModelNotAllowed(GatewayError):
    status, type, code = 403, "invalid_request_error", "model_not_allowed"


class ModelNotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "not_found"


class Conflict(GatewayError):
    status, type, code = 409, "invalid_request_error", "conflict"


class NoEngineReady(GatewayError):
    status, type, code = 503, "service_unavailable_error", "no_engine_ready"
    headers = {"retry-after": "1"}  # engines come back in seconds (router.wait_ready_s)


class Saturated(GatewayError):
    """At capacity. `retry-after-ms` (which the openai SDK reads first, and obeys without
    jitter) is spread over 0.5-1.5x `retry-after`: clients refused together come back
    apart, not as one wave a second later (benchmarks/RESULTS.md, "Overload")."""

    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int, spread: float | None = None):
        super().__init__(message)
        spread = random.random() if spread is None else spread
        self.headers = {
            "retry-after": str(retry_after_s),
            "retry-after-ms": str(round(retry_after_s * 1000 * (0.5 + spread))),
        }


class UpstreamError(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_error"


class UpstreamTimeout(UpstreamError):
    status, type, code = 504, "timeout_error", "upstream_timeout"


class UpstreamStatusError(UpstreamError):
    """The engine answered with an error; keep its status and message."""

    def __init__(
        self, status: int, message: str, *, type_: str | None, param: str | None, code: str | None
    ):
        super().__init__(message, param=param)
        self.code = code
        self.status = status
        # Engines name their own types (vLLM: "BadRequestError"); clients expect OpenAI's.
        self.type = "invalid_request_error" if status < 500 else "upstream_error"


def envelope(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_payload(exc: GatewayError) -> dict[str, Any]:
    return envelope(exc.message, exc.type, exc.param, exc.code)


def sse_error_event(exc: GatewayError) -> bytes:
    """The error event that ends a stream that has already started."""
    return b"data: " + json.dumps(error_payload(exc)).encode() + b"\n\ndata: [DONE]\n\n"


def from_upstream(status: int, body: bytes) -> UpstreamStatusError:
    """Re-wrap an engine's error body (vLLM's or anything else) into our envelope."""
    message, type_, param, code = body.decode(errors="replace")[:2000], None, None, None
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else {}
        if isinstance(err, dict):
            message = str(err.get("message") or message)
            type_, param, code = err.get("type"), err.get("param"), err.get("code")
        elif isinstance(err, str):
            message = err
    except ValueError:
        pass
    if isinstance(code, int):  # vLLM puts the HTTP status there
        code = None
    if status == 400 and "maximum context length" in message:
        code = "context_length_exceeded"  # what the OpenAI API says
    return UpstreamStatusError(status, message, type_=type_, param=param, code=code)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return (f"{param}: {msg}" if param else msg), param


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    """Starlette's bare "Not Found" names the URL, as the OpenAI API's answer does."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and exc.detail == "Not Found":
        return f"Invalid URL ({where})."
    if exc.status_code == 405:
        return f"Invalid method for URL ({where})."
    return str(exc.detail)


def install_error_handlers(app: FastAPI) -> None:
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(error_payload(exc), status_code=exc.status, headers=exc.headers)

    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(envelope(message, "invalid_request_error", param), status_code=400)

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(
            envelope(_http_message(request, exc), type_),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            envelope(f"internal error: {type(exc).__name__}", "server_error"), status_code=500
        )

    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
