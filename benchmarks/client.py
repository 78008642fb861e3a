"""One streamed request against any OpenAI-compatible endpoint, timed event by event.

aiohttp rather than httpx here: the load generator must not be the bottleneck, and
aiohttp's streaming reader costs about half as much CPU per event (it is also what
`vllm bench serve` uses, which keeps the two tools' timings comparable).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from benchmarks.datasets import RequestSpec
from benchmarks.metrics import RequestRecord

PATHS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
}
ENDPOINTS = tuple(PATHS)
# Responses API events that carry output (one per token, as vLLM streams them)
_RESPONSE_DELTAS = frozenset(
    ("response.output_text.delta", "response.reasoning_text.delta", "response.refusal.delta")
)


@dataclass
class Target:
    base_url: str
    model: str
    endpoint: str = "completions"  # a key of PATHS
    api_key: str | None = None
    timeout_s: float = 600.0
    ignore_eos: bool = True  # exact output lengths (a vLLM extension; others ignore it)
    extra_body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + PATHS[self.endpoint]

    def body(self, spec: RequestSpec) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True, "temperature": 0}
        if self.endpoint == "responses":
            # The messages as its input; its usage comes in the last event, unasked.
            body |= {"input": spec.messages(), "max_output_tokens": spec.output_tokens}
        else:
            body |= {"stream_options": {"include_usage": True}, "max_tokens": spec.output_tokens}
            if self.endpoint == "chat":
                body["messages"] = spec.messages()
            else:
                body["prompt"] = spec.text
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body | self.extra_body

    def encode(self, spec: RequestSpec) -> bytes:
        return json.dumps(self.body(spec)).encode()

    def request_headers(self, spec: RequestSpec) -> dict[str, str]:
        headers = {"Content-Type": "application/json", **self.headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        if spec.session:
            headers["x-session-id"] = spec.session
        return headers


def _content(event: dict, chat: bool) -> bool:
    """Does this event carry output? vLLM sends one event per generated token, with empty
    text when a token does not complete a character yet: those count too (as in
    `vllm bench serve`), so ITL is per token rather than per visible character."""
    choices = event.get("choices") or ()
    if not choices:
        return False
    choice = choices[0]
    if not chat:
        return "text" in choice
    delta = choice.get("delta") or {}
    if delta.get("role") and not delta.get("content"):
        return False  # the opening role chunk carries no token
    return any(k in delta for k in ("content", "reasoning_content", "tool_calls"))


def _absorb(event: dict, record: RequestRecord, chat: bool, now: float) -> None:
    """One SSE event: an error, a chunk of output, and/or the usage."""
    if "error" in event:
        record.error_kind = "stream"
        record.error = str(event["error"].get("message", event["error"]))
        return
    if _content(event, chat):
        record.chunk_times.append(now)
    usage = event.get("usage")
    if usage:
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = usage.get("completion_tokens")
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens")


def _absorb_response(event: dict, record: RequestRecord, now: float) -> bool:
    """One Responses API event; True at its last (that API sends no [DONE]): the usage
    comes in `response.completed` or `.incomplete`, a failure as `response.failed`, an
    `error` event, or the gateway's mid-stream `{"error": ...}`."""
    kind = event.get("type")
    if kind in _RESPONSE_DELTAS:
        record.chunk_times.append(now)
        return False
    if kind in ("response.completed", "response.incomplete"):
        usage = (event.get("response") or {}).get("usage") or {}
        record.prompt_tokens = usage.get("input_tokens")
        record.completion_tokens = usage.get("output_tokens")
        record.cached_tokens = (usage.get("input_tokens_details") or {}).get("cached_tokens")
        return True
    if kind == "response.failed" or kind == "error" or "error" in event:
        error = (event.get("response") or {}).get("error") or event.get("error") or event
        record.error_kind = "stream"
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return True
    return False


def _error_message(raw: bytes) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return raw[:200].decode(errors="replace")


async def send(
    http: aiohttp.ClientSession,
    target: Target,
    spec: RequestSpec,
    record: RequestRecord,
    t0: float,
) -> RequestRecord:
    """Send `spec`, filling `record`'s timeline (seconds since `t0`)."""
    clock = time.perf_counter
    chat = target.endpoint == "chat"
    responses = target.endpoint == "responses"
    record.sent = clock() - t0
    try:
        async with http.post(
            target.url, data=spec.body or target.encode(spec), headers=target.request_headers(spec)
        ) as resp:
            record.status = resp.status
            if resp.status != 200:
                record.error_kind = "http_4xx" if resp.status < 500 else "http_5xx"
                record.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
                return record
            done = False
            buffer = b""
            async for data in resp.content.iter_any():  # one await per network read
                now = clock() - t0
                buffer += data
                *events, buffer = buffer.split(b"\n\n")
                for raw in events:
                    at = raw.find(b"data: ")  # 0, or after the Responses API's `event:` line
                    if at < 0:
                        continue
                    payload = raw[at + 6 :].strip()
                    if payload == b"[DONE]":
                        done = True
                        break
                    if responses:
                        if _absorb_response(json.loads(payload), record, now):
                            done = True
                            break
                    else:
                        _absorb(json.loads(payload), record, chat, now)
            if record.error_kind is None and not done:
                last = "its last event" if responses else "[DONE]"
                record.error_kind, record.error = "stream", f"stream ended without {last}"
            elif record.error_kind is None and record.completion_tokens is None:
                record.error_kind = "no_usage"
                record.error = "no usage in the stream (stream_options.include_usage ignored?)"
    except TimeoutError:
        record.error_kind, record.error = "timeout", f"no answer within {target.timeout_s:g} s"
    except aiohttp.ClientError as exc:
        record.error_kind, record.error = "connection", f"{type(exc).__name__}: {exc}"
    except ValueError as exc:
        record.error_kind, record.error = "bad_response", f"not JSON: {exc}"
    except asyncio.CancelledError:
        record.error_kind, record.error = "cancelled", "run stopped before the answer ended"
        raise
    finally:
        record.end = clock() - t0
    return record
