"""Request checks for the fields the gateway reads. Everything else passes through.

Validation returns a validated type, so code downstream never holds an
unchecked request. Types are strict, as the OpenAI API is: "stream": "yes" is
a 400, not a silent cast.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.errors import InvalidRequest


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1)
    user: str | None = None


class ChatRequest(_Passthrough):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Passthrough):
    prompt: str | list[str] | list[int] | list[list[int]]


class ResponsesRequest(_Passthrough):
    """The Responses API (the SDK's `responses.create`), as vLLM serves it."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)


class EmbeddingRequest(_Passthrough):
    """`embeddings.create`: text or token ids, one or a batch. (The SDK asks for base64
    unless told otherwise; vLLM serves both encodings.)"""

    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)


class RerankRequest(_Passthrough):
    """vLLM's /v1/rerank (Jina and Cohere's shape), served by embedding models as the
    cosine of the query's and each document's embedding."""

    query: str | dict[str, Any]
    documents: str | list[Any] = Field(min_length=1)
    top_n: int | None = Field(None, ge=0)


class ScoreRequest(_Passthrough):
    """vLLM's /v1/score: its several shapes (text_1/text_2, queries/documents, ...) are
    the engine's to check."""


Kind = Literal["chat", "completion", "response", "embedding", "rerank", "score"]
POOLING: frozenset[str] = frozenset({"embedding", "rerank", "score"})  # embedding tiers'
_MODELS: dict[str, type[_Passthrough]] = {
    "chat": ChatRequest,
    "completion": CompletionRequest,
    "response": ResponsesRequest,
    "embedding": EmbeddingRequest,
    "rerank": RerankRequest,
    "score": ScoreRequest,
}


def parse_request(kind: Kind, raw: bytes) -> tuple[_Passthrough, dict[str, Any]]:
    """Parse and check a body; returns the checked view and the full payload."""
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest(f"We could not parse the JSON body of your request: {exc}") from exc
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        checked = _MODELS[kind].model_validate(payload)
    except ValidationError as exc:
        raise _invalid(_MODELS[kind], exc.errors()) from exc
    if kind == "chat":
        check_messages(payload["messages"])
    elif kind == "embedding":
        check_embedding(payload)
    elif kind in POOLING and payload.get("stream"):
        raise InvalidRequest("This endpoint does not stream; remove 'stream'.", param="stream")
    return checked, payload


def check_embedding(payload: dict[str, Any]) -> None:
    """What OpenAI refuses and vLLM would take or answer less clearly."""
    given = payload["input"]
    if not given or (isinstance(given, list) and ("" in given or [] in given)):
        raise InvalidRequest(
            "'input' cannot be an empty string or array, nor hold one.",
            param="input",
            code="invalid_value",
        )
    if payload.get("stream"):
        raise InvalidRequest(
            "Embeddings are not streamed; remove 'stream'.", param="stream", code="invalid_value"
        )


def _invalid(model: type[BaseModel], errors: list[dict[str, Any]]) -> InvalidRequest:
    """The first error, by field. A value that fits no member of a union (a prompt of
    5) fails once per member, each under its member's name ('prompt.str'): that is one
    wrong type, said with the types the field takes."""
    loc = errors[0]["loc"]
    field = model.model_fields.get(loc[0]) if isinstance(loc[0], str) else None
    if field is not None and len(loc) > 1 and isinstance(loc[1], str) and len(errors) > 1:
        types = str(field.annotation).replace("typing.", "")
        return InvalidRequest(
            f"Invalid type for '{loc[0]}': expected {types}.", param=loc[0], code="invalid_type"
        )
    param = ".".join(str(p) for p in loc)
    return InvalidRequest(f"Invalid value for '{param}': {errors[0]['msg']}", param=param)


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Each message's role and content type, said by name. vLLM answers these mistakes
    with a dump of every message type it tried ("11 validation errors: ..."). Role
    names themselves are the chat template's business (vLLM takes custom ones, such as
    Llama's "ipython"), so any non-empty string passes. (~0.4 µs for two messages: it
    runs on every chat request.)"""
    for message in messages:
        role, content = message.get("role"), message.get("content")
        if role.__class__ is not str or not role or content.__class__ not in _CONTENT:
            _refuse_messages(messages)


_CONTENT = (str, list, type(None))


def _refuse_messages(messages: list[dict[str, Any]]) -> None:
    for i, message in enumerate(messages):
        role = message.get("role")
        if role is None:
            raise InvalidRequest(
                f"Missing required parameter: 'messages.{i}.role'.",
                param=f"messages.{i}.role",
                code="missing_required_parameter",
            )
        if not isinstance(role, str) or not role:
            raise InvalidRequest(
                f"Invalid value for 'messages.{i}.role': expected a non-empty string.",
                param=f"messages.{i}.role",
                code="invalid_value",
            )
        if not isinstance(message.get("content"), _CONTENT):
            raise InvalidRequest(
                f"Invalid type for 'messages.{i}.content': expected a string or an array "
                "of content parts.",
                param=f"messages.{i}.content",
                code="invalid_type",
            )


def as_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """A Responses API request seen as a chat one, for what the router reads (prompt
    tokens, output limit, tools, affinity): the payload sent on stays as it came."""
    messages: list[dict[str, Any]] = []
    if payload.get("instructions"):
        messages.append({"role": "system", "content": payload["instructions"]})
    given = payload["input"]
    for item in [{"role": "user", "content": given}] if isinstance(given, str) else given:
        if "role" in item:
            messages.append({"role": item["role"], "content": item.get("content") or ""})
        elif item.get("type") == "function_call_output":
            messages.append({"role": "tool", "content": str(item.get("output", ""))})
    text = payload.get("text")
    view = {"messages": messages or [{"role": "user", "content": ""}]}
    for key, value in (
        ("max_tokens", payload.get("max_output_tokens")),
        ("tools", _chat_tools(payload.get("tools"))),
        ("response_format", text.get("format") if isinstance(text, dict) else None),
        ("metadata", payload.get("metadata")),
        ("user", payload.get("user")),
    ):
        if value is not None:
            view[key] = value
    return view


def _chat_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses API function tools (flat) in the chat shape a chat template reads."""
    if not isinstance(tools, list):
        return None
    chat = [
        {"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function" and "name" in t
    ]
    return chat or None
