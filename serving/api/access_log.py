"""One JSON line per request (`server.access_log: json`), for log pipelines.

Fields: request_id, path, model, tier, replica, status, stream, prompt_tokens,
completion_tokens, ttft_ms, duration_ms, retries, reason (the routing decision),
error (a stream's error code, or the refusal's), key (the client key's name, once keys
have names; null until then). Never the prompt. Written by python-json-logger on the
`tiergate.access` logger, to stdout; off by default, so `make serve` prints nothing new.
"""

from __future__ import annotations

import logging
import re
import sys
import uuid
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(given: str | None) -> str:
    """The client's x-request-id when it is a sane token, else a new one."""
    if given and _REQUEST_ID.match(given):
        return given
    return uuid.uuid4().hex


def valid_traceparent(value: str | None) -> str | None:
    """A W3C traceparent header to pass on, or None (malformed ones are dropped)."""
    return value if value and _TRACEPARENT.match(value) else None


class AccessLog:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.log = logging.getLogger("tiergate.access")
        if enabled:  # one gateway per process: its handler replaces any earlier one
            handler = logging.StreamHandler(stream or sys.stdout)
            handler.setFormatter(
                JsonFormatter("%(asctime)s %(message)s", rename_fields={"asctime": "time"})
            )
            self.log.handlers = [handler]
            self.log.setLevel(logging.INFO)
            self.log.propagate = False

    def write(self, **fields: object) -> None:
        if self.enabled:
            self.log.info("request", extra=fields)
