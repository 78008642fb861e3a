"""One JSON line per request (`server.access_log: json`), for log pipelines.

Fields: request_id, path, model, tier, replica, status, stream, prompt_tokens,
completion_tokens, ttft_ms, duration_ms, retries, reason (the routing decision),
error (a stream's error code, or the refusal's), tenant and key (the key's name, never
the key: "config" for a server.api_keys key, "anonymous" on an open gateway), cost_usd
(from the tier's prices). This is the audit log: never the prompt. Written by
python-json-logger on the `tiergate.access` logger, to stdout; off by default, so
`make serve` prints nothing new. `server.access_log_prompt_sample` (0 by default) adds
the prompt to that share of lines, redacted (`redact`), for quality reviews.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
from typing import TextIO

from pythonjsonlogger.json import JsonFormatter

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def request_id(given: str | None) -> str:
    """The client's x-request-id when it is a sane token, else a new one."""
    if given and _REQUEST_ID.match(given):
        return given
    return os.urandom(16).hex()  # 32 hex digits as uuid4().hex, at ~1/6 of its cost


_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PHONE = re.compile(r"(?<![\w+(])\(?\+?\d[\d\s().-]{7,}\d(?!\w)")
_SECRET = re.compile(
    r"\b(?:sk|pk|rk|tg|ghp|gho|xox[abpr]|AKIA|AIza)[-_A-Za-z0-9]{8,}|"  # known key shapes
    r"\b(?=[A-Za-z0-9_-]*\d)(?=[A-Za-z0-9_-]*[A-Za-z])[A-Za-z0-9_-]{32,}\b"  # long tokens
)


def redact(text: str) -> str:
    """A prompt fit for a log sample: API-key-looking strings, emails and phone numbers
    replaced by a marker. Pure."""
    text = _SECRET.sub("[key]", text)
    text = _EMAIL.sub("[email]", text)
    # 9+ digits: a phone number; fewer (a date, an order number) stays
    return _PHONE.sub(lambda m: "[phone]" if sum(c.isdigit() for c in m[0]) >= 9 else m[0], text)


def prompt_text(payload: dict, limit: int = 2000) -> str:
    """The request's text (chat messages' contents, or the prompt), cut at `limit`."""
    if "messages" in payload:
        parts = []
        for m in payload.get("messages") or []:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # content parts
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str):
                parts.append(f"{m.get('role', '?')}: {content}")
        text = "\n".join(parts)
    else:
        prompt = payload.get("prompt")
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:limit]


def valid_traceparent(value: str | None) -> str | None:
    """A W3C traceparent header to pass on, or None (malformed ones are dropped)."""
    return value if value and _TRACEPARENT.match(value) else None


class AccessLog:
    def __init__(
        self, enabled: bool, stream: TextIO | None = None, prompt_sample: float = 0.0
    ) -> None:
        self.enabled = enabled
        self.prompt_sample = prompt_sample if enabled else 0.0
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

    def sampled_prompt(self, payload: dict) -> str | None:
        """The redacted prompt for this line, for the sampled share; else None."""
        if self.prompt_sample and random.random() < self.prompt_sample:
            return redact(prompt_text(payload))
        return None
