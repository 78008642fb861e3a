"""The bench client against FAKE servers: its own ceiling, and failures it must count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench
from benchmarks.launch import free_port
from benchmarks.studies.client_ceiling import start_fake
from models.manifest import load_manifest
from models.prepare import prepare
from serving.config import Settings
from tests.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def tokenizer_dir() -> str:
    cache = Settings.model_fields["model_cache"].default_factory()
    return str(prepare(load_manifest("smollm2-135m-instruct"), cache))


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    proc = start_fake(port)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    assert proc.poll() is not None


def run(url: str, out: Path, tokenizer: str, *extra: str) -> dict:
    args = bench.build_parser().parse_args(
        [
            "--base-url",
            url,
            "--model",
            "fake",
            "--tokenizer",
            tokenizer,
            "--out",
            str(out),
            "--input-len",
            "16",
            "--output-len",
            "4",
            *extra,
        ]
    )
    assert bench.main(args) == 0
    return json.loads((out / "bench.json").read_text())


def client_flags(point: dict) -> list[str]:
    return [r for r in point["verdict"]["reasons"] if "client saturated" in r]


def test_client_keeps_up_and_flags_itself_past_its_ceiling(fake_url, tokenizer_dir, tmp_path):
    doc = run(fake_url, tmp_path, tokenizer_dir, "--rate", "100", "8000", "--duration", "0.75")
    easy, hard = doc["points"]
    assert easy["summary"]["completed"] == easy["summary"]["requests"] > 50
    assert client_flags(easy) == []
    assert easy["summary"]["req_s"] == pytest.approx(100, rel=0.25)
    assert client_flags(hard), hard["verdict"]  # 8,000 req/s is far past one core


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        ("error-500", "http_5xx"),
        ("garbage", "http_5xx"),
        ("cut-stream", "connection"),
        ("no-done", "stream"),
        ("ok", "no_usage"),
    ],
)
def test_failures_are_counted_by_kind(behaviour, kind, tokenizer_dir, tmp_path) -> None:
    with FakeEngine(force=behaviour) as engine:
        doc = run(
            engine.url,
            tmp_path,
            tokenizer_dir,
            "--endpoint",
            "chat",
            "--concurrency",
            "2",
            "--requests",
            "4",
        )
    point = doc["points"][0]
    assert point["summary"]["errors"] == {kind: 4}
    assert point["summary"]["goodput_share"] == 0
    assert any("errors: 100.0%" in r for r in point["verdict"]["reasons"])
    assert all(r["error"] for r in point["requests"])


@pytest.mark.parametrize(
    ("behaviour", "kind"),
    [
        ("ok", None),
        ("cut-stream", "connection"),
        ("no-done", "stream"),  # no response.completed: the stream's end is not its last
        ("error-event", "stream"),
    ],
)
def test_responses_api_outcomes_are_counted_by_kind(behaviour, kind, tokenizer_dir, tmp_path):
    """--endpoint responses against the FAKE engine's Responses stream."""
    with FakeEngine(force=behaviour) as engine:
        doc = run(
            engine.url,
            tmp_path,
            tokenizer_dir,
            "--endpoint",
            "responses",
            "--concurrency",
            "2",
            "--requests",
            "4",
        )
    point = doc["points"][0]
    records = point["requests"]
    assert len(records) == 4
    if kind is None:
        assert point["summary"]["completed"] == 4 and not point["summary"]["errors"]
        assert all(r["prompt_tokens"] == 5 and r["completion_tokens"] == 2 for r in records)
    else:
        assert point["summary"]["errors"] == {kind: 4}
        assert all(r["error"] for r in records)
    if behaviour == "error-event":
        assert all("the engine failed" in r["error"] for r in records)


def test_a_stalled_stream_times_out(tokenizer_dir, tmp_path) -> None:
    with FakeEngine(force="stall-stream") as engine:
        doc = run(
            engine.url,
            tmp_path,
            tokenizer_dir,
            "--endpoint",
            "chat",
            "--concurrency",
            "1",
            "--requests",
            "1",
            "--timeout",
            "1",
        )
    assert doc["points"][0]["summary"]["errors"] == {"timeout": 1}


def test_bad_arguments_are_refused(tokenizer_dir, tmp_path) -> None:
    parser = bench.build_parser()
    common = ["--base-url", "http://x", "--model", "m", "--out", str(tmp_path)]
    common += ["--concurrency", "1"]
    with pytest.raises(SystemExit, match="--duration or --requests"):
        bench.main(parser.parse_args(common))
    with pytest.raises(SystemExit, match="--turns needs --endpoint chat"):
        bench.main(parser.parse_args([*common, "--requests", "1", "--turns", "2"]))
    with pytest.raises(SystemExit, match="--turn-len and --live-sessions need --turns > 1"):
        bench.main(parser.parse_args([*common, "--requests", "1", "--live-sessions", "4"]))
    with pytest.raises(SystemExit, match="--turn-len needs --dataset synthetic"):
        args = [*common, "--requests", "1", "--turns", "2", "--endpoint", "chat"]
        bench.main(parser.parse_args([*args, "--turn-len", "20", "--dataset", "sharegpt"]))
    with pytest.raises(SystemExit, match="--live-sessions needs --concurrency, and a session"):
        args = [*common, "--requests", "1", "--turns", "2", "--endpoint", "chat"]
        bench.main(parser.parse_args([*args, "--concurrency", "8", "--live-sessions", "4"]))
    chat = ["--base-url", "http://x", "--model", "m", "--out", str(tmp_path), "--requests", "1"]
    chat += ["--turns", "2", "--endpoint", "chat", "--think-time"]
    for bad in (["1", "--concurrency", "1"], ["-1", "--rate", "2"]):  # closed loop; < 0
        with pytest.raises(SystemExit, match="--think-time needs --rate and --turns > 1"):
            bench.main(parser.parse_args([*chat, *bad]))
    with pytest.raises(SystemExit, match="unknown length table 'nope'"):
        bench.main(parser.parse_args([*common, "--requests", "1", "--lengths", "nope"]))
    with pytest.raises(SystemExit, match="--lengths needs --dataset synthetic"):
        args = [*common, "--requests", "1", "--lengths", "sharegpt", "--dataset", "sharegpt"]
        bench.main(parser.parse_args(args))
    with pytest.raises(SystemExit):  # a closed and an open loop at once
        parser.parse_args([*common, "--rate", "2"])


def test_live_sessions_interleave_their_turns(fake_url) -> None:
    """One client: by default it runs a conversation to its end; with 3 sessions open,
    it takes a waiting one's next turn at random (a think time), as users come back."""
    import asyncio

    from benchmarks.client import Target
    from benchmarks.datasets import RequestSpec
    from benchmarks.runner import Load
    from benchmarks.runner import run as run_load

    def order(live: int) -> list[tuple[str, int]]:
        sessions = [
            [RequestSpec(text=f"s{s} t{t}", input_tokens=4, output_tokens=2, session=f"s{s}",
                         turn=t) for t in range(3)]
            for s in range(3)
        ]  # fmt: skip
        load = Load("concurrency", 1, count=3, live=live)
        result = asyncio.run(run_load(Target(fake_url, "fake", "chat"), iter(sessions), load))
        assert all(r.ok for r in result.records) and not result.ran_out
        return [(r.session, r.turn) for r in result.records]

    assert order(0) == [(f"s{s}", t) for s in range(3) for t in range(3)]
    mixed = order(3)
    assert sorted(mixed) == order(0)  # every turn once
    assert all([t for s, t in mixed if s == name] == [0, 1, 2] for name in ("s0", "s1", "s2"))
    assert mixed != order(0)  # not one conversation to its end, then the next
    assert order(3) == mixed  # the draw is seeded: runs repeat


def test_open_loop_turns_wait_a_seeded_think_time(fake_url) -> None:
    """Open loop: a session's next turn goes once its answer is back, plus a think time
    drawn per session from the seed (the same however the answers interleave)."""
    import asyncio
    import itertools
    import random

    from benchmarks.client import Target
    from benchmarks.datasets import RequestSpec
    from benchmarks.runner import Load
    from benchmarks.runner import run as run_load

    def gaps(think: float) -> dict[str, list[float]]:
        sessions = [
            [RequestSpec(text=f"s{s} t{t}", input_tokens=4, output_tokens=2, session=f"s{s}",
                         turn=t) for t in range(3)]
            for s in range(3)
        ]  # fmt: skip
        load = Load("rate", 50, count=3, seed=7, think=think)
        result = asyncio.run(run_load(Target(fake_url, "fake", "chat"), iter(sessions), load))
        assert len(result.records) == 9 and all(r.ok for r in result.records)
        out: dict[str, list[float]] = {}
        for name in ("s0", "s1", "s2"):
            mine = sorted((r for r in result.records if r.session == name), key=lambda r: r.turn)
            assert [r.turn for r in mine] == [0, 1, 2]
            assert all(r.sent >= r.scheduled - 0.005 for r in mine)  # none before it was due
            out[name] = [b.scheduled - a.end for a, b in itertools.pairwise(mine)]
        return out

    assert all(g == [0.0, 0.0] for g in gaps(0).values())  # the default: at once
    thought = gaps(0.05)
    for k, name in enumerate(("s0", "s1", "s2")):
        draw = random.Random(7 * 1_000_003 + k)
        assert thought[name] == pytest.approx([draw.expovariate(20), draw.expovariate(20)])
    again = gaps(0.05)  # seeded: runs repeat (to float rounding of end + think - end)
    assert all(again[n] == pytest.approx(thought[n], abs=1e-9) for n in thought)


def test_prefix_routing_run_keeps_every_request(fake_url) -> None:
    """A study run's row, and every request as `tiergate bench` writes it (FAKE server)."""
    import asyncio
    import statistics

    from benchmarks.datasets import RequestSpec
    from benchmarks.studies.prefix_routing import one_run

    sessions = [
        [RequestSpec(text=f"s{s} t{t}", input_tokens=4, output_tokens=2, session=f"s{s}",
                     turn=t) for t in range(2)]
        for s in range(3)
    ]  # fmt: skip
    row = asyncio.run(one_run(fake_url, "fake", iter(sessions), 2, live=3))
    records = row.pop("records")
    assert (row["requests"], row["errors"]) == (6, 0)
    assert sorted((r["session"], r["turn"]) for r in records) == [
        (f"s{s}", t) for s in range(3) for t in range(2)
    ]
    assert all(r["status"] == 200 and r["completion_tokens"] == 2 for r in records)
    later = statistics.median(r["ttft_ms"] for r in records if r["turn"] == 1)
    assert row["ttft_p50_later_ms"] == pytest.approx(later, abs=1e-3)  # rows round to µs
    json.dumps(records)  # written as is
