"""The gateway's OpenAPI document: FastAPI's routes, plus the hot routes, which are
served before FastAPI sees a request (serving/api/hotpath.py) and so are added here
from the same pydantic models that check their bodies. Every error is the one OpenAI
envelope."""

from __future__ import annotations

from typing import Any

from serving.api.protocol import (
    ChatRequest,
    CompletionRequest,
    EmbeddingRequest,
    RerankRequest,
    ResponsesRequest,
    ScoreRequest,
)

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "integer", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "Invalid request (the field is in `param`), or a context too long",
    "401": "Missing or wrong API key",
    "403": "A tier the tenant may not use",
    "404": "Unknown model",
    "413": "Body over server.max_body_bytes",
    "429": "A limit (Retry-After and x-ratelimit-* headers), or every replica full",
    "502": "The engine failed",
    "503": "No engine ready",
    "504": "The engine did not answer in time",
}


def _operation(model: type, summary: str, op_id: str, models: list[str]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    if models:  # the models this gateway serves (its tiers', and auto)
        schema["properties"]["model"]["enum"] = models
    responses: dict[str, Any] = {
        "200": {
            "description": "The engine's answer; with stream: true, server-sent events "
            "ending in `data: [DONE]` (after a stream starts, an error is one "
            '`data: {"error": ...}` event, then `data: [DONE]`).',
            "content": {
                "application/json": {"schema": {"type": "object"}},
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    }
    for status, text in _ERRORS.items():
        responses[status] = {
            "description": text,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {
        "post": {
            "summary": summary,
            "operationId": op_id,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": schema}},
            },
            "responses": responses,
            "security": [{"bearer": []}],
        }
    }


def add_hot_routes(doc: dict[str, Any], models: list[str] | None = None) -> dict[str, Any]:
    """FastAPI's document with the hot routes, the error envelope and bearer auth."""
    doc.setdefault("paths", {})
    doc["paths"]["/v1/chat/completions"] = _operation(
        ChatRequest, "Chat completion (OpenAI-compatible)", "chat_completions", models or []
    )
    doc["paths"]["/v1/completions"] = _operation(
        CompletionRequest, "Text completion (OpenAI-compatible)", "completions", models or []
    )
    doc["paths"]["/v1/responses"] = _operation(
        ResponsesRequest,
        "Response (OpenAI Responses API, as vLLM serves it)",
        "responses",
        models or [],
    )
    doc["paths"]["/v1/embeddings"] = _operation(
        EmbeddingRequest,
        "Embeddings (OpenAI-compatible), from a tier whose task is embed",
        "embeddings",
        models or [],
    )
    doc["paths"]["/v1/rerank"] = _operation(
        RerankRequest,
        "Rerank documents by a query (vLLM's, embedding tiers)",
        "rerank",
        models or [],
    )
    doc["paths"]["/v1/score"] = _operation(
        ScoreRequest,
        "Similarity scores of text pairs (vLLM's, embedding tiers)",
        "score",
        models or [],
    )
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR
    components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    return doc
