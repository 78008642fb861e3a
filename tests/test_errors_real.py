"""Every bad input, against the real engine: status, OpenAI error body, nothing left behind."""

from __future__ import annotations

import httpx
import pytest

from tests.utils import GatewayProcess

MSG = [{"role": "user", "content": "Hi"}]


def _post(gw: GatewayProcess, path: str, **kwargs) -> httpx.Response:
    return httpx.post(gw.url + path, timeout=60, **kwargs)


def _assert_envelope(r: httpx.Response, status: int, type_: str, code=None, param=None) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["code"] == code
    if param is not None:
        assert body["error"]["param"] == param
    assert body["error"]["message"]
    return body["error"]["message"]


@pytest.fixture(autouse=True)
def _nothing_left_behind(gateway: GatewayProcess, model: str):
    yield
    engines = gateway.engines()
    assert all(e["in_flight"] == 0 for e in engines), engines
    assert all(e["ready"] for e in engines), engines
    ok = _post(
        gateway, "/v1/chat/completions", json={"model": model, "messages": MSG, "max_tokens": 2}
    )
    assert ok.status_code == 200  # the gateway still serves after the bad request


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_malformed_json_is_400(gateway: GatewayProcess, path: str) -> None:
    r = _post(
        gateway,
        path,
        content=b'{"model": "x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert "parse the JSON" in _assert_envelope(r, 400, "invalid_request_error")


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("stream", "yes", "stream"),
        ("max_tokens", "5", "max_tokens"),
        ("messages", "hello", "messages"),
        ("temperature", 7, "temperature"),
        ("model", 3, "model"),
    ],
)
def test_wrong_field_type_is_400(
    gateway: GatewayProcess, model: str, field: str, value, param: str
) -> None:
    body = {"model": model, "messages": MSG, field: value}
    r = _post(gateway, "/v1/chat/completions", json=body)
    message = _assert_envelope(r, 400, "invalid_request_error", param=param)
    assert param in message


def test_missing_messages_is_400(gateway: GatewayProcess, model: str) -> None:
    r = _post(gateway, "/v1/chat/completions", json={"model": model})
    _assert_envelope(r, 400, "invalid_request_error", param="messages")


@pytest.mark.parametrize(
    ("message", "param", "code"),
    [
        ({"content": "Hi"}, "messages.1.role", "missing_required_parameter"),
        ({"role": 5, "content": "Hi"}, "messages.1.role", "invalid_value"),
        ({"role": "", "content": "Hi"}, "messages.1.role", "invalid_value"),
        ({"role": "user", "content": 5}, "messages.1.content", "invalid_type"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_malformed_message_is_400_naming_it(
    gateway: GatewayProcess, model: str, message: dict, param: str, code: str, stream: bool
) -> None:
    # vLLM's own answer to these lists every message type it tried; ours names the field.
    body = {"model": model, "messages": [*MSG, message], "stream": stream}
    r = _post(gateway, "/v1/chat/completions", json=body)
    text = _assert_envelope(r, 400, "invalid_request_error", code=code, param=param)
    assert param in text and "validation errors" not in text


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("/v1/responses", {}, "input", None),
        ("/v1/responses", {"input": 5}, "input", "invalid_type"),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 0}, "max_output_tokens", None),
        ("/v1/completions", {"prompt": 5}, "prompt", "invalid_type"),
    ],
)
def test_a_bad_responses_or_completions_body_is_400_naming_the_field(
    gateway: GatewayProcess, model: str, path: str, body: dict, param: str, code
) -> None:
    r = _post(gateway, path, json={"model": model, **body})
    assert param in _assert_envelope(r, 400, "invalid_request_error", code=code, param=param)


def test_body_not_an_object_is_400(gateway: GatewayProcess) -> None:
    r = _post(gateway, "/v1/completions", json=[1, 2])
    _assert_envelope(r, 400, "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_404(gateway: GatewayProcess, stream: bool) -> None:
    r = _post(
        gateway,
        "/v1/chat/completions",
        json={"model": "gpt-nope", "messages": MSG, "stream": stream},
    )
    message = _assert_envelope(
        r, 404, "invalid_request_error", code="model_not_found", param="model"
    )
    assert "gpt-nope" in message


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400_with_limit(
    gateway: GatewayProcess, model: str, stream: bool
) -> None:
    r = _post(
        gateway,
        "/v1/completions",
        json={"model": model, "prompt": "hello " * 3000, "stream": stream},
    )
    message = _assert_envelope(r, 400, "invalid_request_error", code="context_length_exceeded")
    assert "2048" in message  # the engine's max_model_len


def test_body_over_limit_is_413(gateway: GatewayProcess, model: str) -> None:
    big = "x" * (4 * 1024 * 1024 + 10)  # configs/default.yaml: server.max_body_bytes
    r = _post(
        gateway,
        "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": big}]},
    )
    assert "4194304" in _assert_envelope(r, 413, "invalid_request_error", code="request_too_large")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/nothing"), ("POST", "/v1/audio/speech")],
)
def test_unknown_route_is_404_naming_the_url(gateway: GatewayProcess, method, path) -> None:
    r = httpx.request(method, gateway.url + path, json={}, timeout=60)
    message = _assert_envelope(r, 404, "invalid_request_error")
    assert message == f"Invalid URL ({method} {path})."


def test_an_unknown_stored_response_is_404(gateway: GatewayProcess) -> None:
    r = httpx.get(gateway.url + "/v1/responses/resp_1", timeout=60)
    message = _assert_envelope(r, 404, "invalid_request_error", "not_found", "response_id")
    assert message == "Response with id 'resp_1' not found."
    # vLLM deletes none: the method is refused, not lost
    r = httpx.delete(gateway.url + "/v1/responses/resp_1", timeout=60)
    assert _assert_envelope(r, 405, "invalid_request_error").startswith("Invalid method")


def test_a_wrong_method_is_405_naming_the_url(gateway: GatewayProcess) -> None:
    r = _post(gateway, "/v1/models", json={})
    message = _assert_envelope(r, 405, "invalid_request_error")
    assert message == "Invalid method for URL (POST /v1/models)."


def test_retrieving_an_unknown_model_is_404(gateway: GatewayProcess) -> None:
    for name in ("gpt-nope", "org/gpt-nope"):
        r = httpx.get(f"{gateway.url}/v1/models/{name}", timeout=60)
        message = _assert_envelope(
            r, 404, "invalid_request_error", code="model_not_found", param="model"
        )
        assert name in message
