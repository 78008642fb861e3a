"""Pure request checks and views (serving/api/protocol.py)."""

from __future__ import annotations

import json

import pytest

from serving.api.access_log import prompt_text
from serving.api.protocol import as_chat, parse_request
from serving.errors import InvalidRequest


def test_a_responses_request_reads_as_a_chat_for_the_router() -> None:
    payload = {
        "model": "auto",
        "instructions": "Be brief.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            {"type": "function_call", "name": "f", "arguments": "{}", "call_id": "c"},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
        ],
        "max_output_tokens": 9,
        "tools": [{"type": "function", "name": "f", "parameters": {}}, {"type": "web_search"}],
        "text": {"format": {"type": "json_object"}},
        "user": "u1",
    }
    view = as_chat(payload)
    assert view["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        {"role": "tool", "content": "42"},
    ]
    assert view["max_tokens"] == 9 and view["user"] == "u1"
    # the chat shape a chat template reads; a built-in tool has no template form
    assert view["tools"] == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert view["response_format"] == {"type": "json_object"}
    assert as_chat({"model": "m", "input": "Hi"}) == {
        "messages": [{"role": "user", "content": "Hi"}]
    }
    assert prompt_text(view) == "system: Be brief.\nuser: Hi\ntool: 42"


@pytest.mark.parametrize(
    ("kind", "body", "param", "code"),
    [
        ("completion", {"prompt": 5}, "prompt", "invalid_type"),
        ("response", {"input": [5]}, "input", "invalid_type"),
        ("chat", {"messages": [{"role": "user"}, {"content": "x"}]}, "messages.1.role", None),
        ("chat", {"messages": [{"role": "user", "content": {}}]}, "messages.0.content", None),
        ("chat", {"messages": ["hi"]}, "messages.0", None),
    ],
)
def test_a_bad_field_is_named_once(kind, body, param, code) -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_request(kind, json.dumps({"model": "m", **body}).encode())
    assert refused.value.param == param and f"'{param}'" in refused.value.message
    if code:
        assert refused.value.code == code


def test_custom_roles_and_null_content_pass() -> None:
    # vLLM takes roles its chat template knows (Llama's "ipython"); so does the gateway.
    messages = [{"role": "ipython", "content": "1"}, {"role": "assistant", "content": None}]
    raw = json.dumps({"model": "m", "messages": messages}).encode()
    checked, payload = parse_request("chat", raw)
    assert payload["messages"] == messages and checked.model == "m"
