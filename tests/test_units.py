"""Pure pieces: SSE splitting, usage extraction, engine choice, CLI flags, error mapping."""

from __future__ import annotations

import json

import pytest

from serving.engines.process import engine_args_to_cli
from serving.errors import NoEngineReady, from_upstream, sse_error_event
from serving.upstream.stream import Relay, StreamOutcome, is_usage_only, split_events, usage_of


def test_split_events_keeps_partial_event() -> None:
    events, rest = split_events(b"", b'data: {"a":1}\n\ndata: {"b"')
    assert events == [b'data: {"a":1}']
    events, rest = split_events(rest, b":2}\n\ndata: [DONE]\n\n")
    assert events == [b'data: {"b":2}', b"data: [DONE]"]
    assert rest == b""


def test_usage_of_and_usage_only() -> None:
    usage_event = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}'
    assert usage_of(usage_event) == {"prompt_tokens": 3, "completion_tokens": 2}
    assert is_usage_only(usage_event)
    assert usage_of(b'data: {"choices":[{"delta":{"content":"x"}}]}') is None
    assert usage_of(b"data: [DONE]") is None


_TOKEN = b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
_ABORT = b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"abort"}]}\n\n'
_USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'


@pytest.mark.parametrize(
    "reads",
    [
        [_TOKEN, _ABORT + _USAGE, b"data: [DONE]\n\n"],  # the end in one read
        [_TOKEN, _ABORT, _USAGE, b"data: [DONE]\n\n"],  # the abort event passes whole
        [_TOKEN, _ABORT, _USAGE[:20], _USAGE[20:], b"data: [DONE]\n\n"],  # then a part
    ],
    ids=["together", "apart", "then-partial"],
)
def test_a_stream_the_engine_aborted_ends_with_the_error_event(reads: list[bytes]) -> None:
    """vLLM ends a request it aborted (the engine stopping) with finish_reason "abort",
    usage and [DONE]: a normal-looking end that the relay turns into the error event, in
    whichever socket reads the events come."""
    outcome = StreamOutcome(started=0.0)
    relay = Relay(response=None, outcome=outcome, drop_usage=True, first=b"")
    out = b""
    for read in reads:
        if outcome.done:
            relay.after_end(read)  # what _chunk does once the client's response ended
        else:
            out += relay.feed(read)
    events = [e.removeprefix(b"data: ") for e in out.split(b"\n\n") if e]
    assert events[-1] == b"[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_aborted"
    assert events.count(b"[DONE]") == 1 and outcome.done and outcome.error == "engine_aborted"
    assert not any(b'"prompt_tokens"' in e for e in events)  # asked for by us, not shown
    assert outcome.usage == {"prompt_tokens": 3, "completion_tokens": 2}  # still counted
    clean = Relay(response=None, outcome=StreamOutcome(started=0.0), drop_usage=True, first=b"")
    out = b"".join(clean.feed(r) for r in (_TOKEN, _TOKEN, _USAGE, b"data: [DONE]\n\n"))
    assert out == _TOKEN + _TOKEN + b"data: [DONE]\n\n"  # an ordinary end is untouched


def test_an_aborted_streams_usage_is_counted_when_it_comes_after_the_end() -> None:
    """The abort event ends the client's response; the engine's usage event, read later
    (here: the abort event came in two reads, so it ended the response by itself), is
    still counted, and nothing more is sent."""
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    outcome = StreamOutcome(started=0.0)
    relay = Relay(response=None, outcome=outcome, drop_usage=True, first=b"")
    relay.send = send
    for read in (_TOKEN, _ABORT[:20], _ABORT[20:], _USAGE, b"data: [DONE]\n\n"):
        relay._chunk(read)
    assert outcome.error == "engine_aborted" and relay.ended
    assert outcome.usage == {"prompt_tokens": 3, "completion_tokens": 2}
    assert [m["more_body"] for m in sent] == [True, False]  # the token; then the error
    assert b'"engine_aborted"' in sent[-1]["body"] and sent[-1]["body"].endswith(b"[DONE]\n\n")


def test_sse_error_event_ends_with_done() -> None:
    event = sse_error_event(NoEngineReady("down"))
    parts = event.decode().strip().split("\n\n")
    assert parts[-1] == "data: [DONE]"
    assert json.loads(parts[0].removeprefix("data: "))["error"]["code"] == "no_engine_ready"


def test_from_upstream_rewraps_vllm_errors() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 2048",
                "type": "BadRequestError",
                "param": "input_tokens",
                "code": 400,
            }
        }
    ).encode()
    err = from_upstream(400, body)
    assert (err.status, err.type, err.code, err.param) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "input_tokens",
    )
    assert from_upstream(500, b"not json").message == "not json"


def test_engine_args_to_cli() -> None:
    assert engine_args_to_cli(
        {
            "max_model_len": 2048,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "kv_transfer_config": {"a": 1},
            "quantization": None,
        }
    ) == [
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--kv-transfer-config",
        '{"a": 1}',
    ]


def test_cpu_defaults_pick_dtype_from_cpu_flags(tmp_path) -> None:
    from serving.engines.cpu import apply_cpu_defaults, cpu_flags, default_cpu_dtype

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert default_cpu_dtype({"avx2"}) == "float32"
    assert default_cpu_dtype({"avx512_bf16"}) == "bfloat16"
    # AMX Xeons: bf16 fails the golden gate there (RESULTS.md), so float32
    assert default_cpu_dtype({"avx2", "avx512_bf16", "amx_bf16", "amx_int8"}) == "float32"
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    args, env = apply_cpu_defaults({"max_model_len": 8}, {}, {"avx2"}, prefix=tmp_path)
    assert args == {"max_model_len": 8, "dtype": "float32"}
    assert env == {"LD_PRELOAD": str(tmp_path / "lib" / "libiomp5.so")}
    # Whatever the config says explicitly wins.
    args, env = apply_cpu_defaults(
        {"dtype": "bfloat16"}, {"LD_PRELOAD": "x"}, {"avx2"}, prefix=tmp_path
    )
    assert (args, env) == ({"dtype": "bfloat16"}, {"LD_PRELOAD": "x"})


def test_cpu_engine_choice_quality_first_then_speed() -> None:
    from models.manifest import CpuVariant
    from serving.engines.cpu import choose_cpu_engine, engine_choice

    amx = {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8"}
    variant = CpuVariant(flags=["amx_int8", "amx_bf16"], model="m-w8a8", dtype="bfloat16", why="x")
    choice = choose_cpu_engine("m", {}, amx, [variant])
    assert (choice.model, choice.dtype) == ("m-w8a8", "bfloat16")
    # without the flags, without the variant, or with it switched off: the dtype rule
    assert choose_cpu_engine("m", {}, {"avx2"}, [variant]).model == "m"
    assert choose_cpu_engine("m", {}, amx, []).dtype == "float32"
    assert choose_cpu_engine("m", {}, amx, [variant], allow_variant=False).model == "m"
    assert choose_cpu_engine("m", {"quantization": "x"}, amx, [variant]).model == "m"
    # an explicit dtype wins over everything
    assert choose_cpu_engine("m", {"dtype": "bfloat16"}, amx, [variant]) is None
    # the shipped manifests: the default model serves its W8A8 variant on AMX hosts only
    assert engine_choice("smollm2-135m-instruct", {}, True, amx).model.endswith("-w8a8")
    assert engine_choice("smollm2-135m-instruct", {}, True, {"avx2"}).dtype == "float32"
    assert engine_choice("not-a-manifest", {}, True, {"avx2"}).model == "not-a-manifest"
