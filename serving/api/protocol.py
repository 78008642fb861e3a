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


Kind = Literal["chat", "completion"]
_MODELS: dict[str, type[_Passthrough]] = {"chat": ChatRequest, "completion": CompletionRequest}


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
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest(f"Invalid value for '{param}': {err['msg']}", param=param) from exc
    if kind == "chat":
        check_messages(payload["messages"])
    return checked, payload


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Each message's role and content type, said by name. vLLM answers these mistakes
    with a dump of every message type it tried ("11 validation errors: ..."). Role
    names themselves are the chat template's business (vLLM takes custom ones, such as
    Llama's "ipython"), so any non-empty string passes."""
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
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"Invalid type for 'messages.{i}.content': expected a string or an array "
                "of content parts.",
                param=f"messages.{i}.content",
                code="invalid_type",
            )
