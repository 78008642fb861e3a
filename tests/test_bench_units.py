"""Bench arithmetic on hand-made timelines: metrics, arrivals, verdict rules, plan."""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import time

import pytest

from benchmarks.arrivals import arrival_offsets
from benchmarks.capacity import cost, find_limit, mix_factor, replicas_needed
from benchmarks.datasets import LengthDist
from benchmarks.metrics import SLO, RequestRecord, percentiles, summarize
from benchmarks.studies.overhead import call_counts
from benchmarks.verdict import RunFacts, Thresholds, judge


def rec(i: int, scheduled: float, sent: float, chunks: list[float], tokens: int, **kw):
    return RequestRecord(
        index=i,
        scheduled=scheduled,
        sent=sent,
        end=chunks[-1] + 0.01 if chunks else sent + 0.01,
        chunk_times=chunks,
        prompt_tokens=10,
        completion_tokens=tokens,
        **kw,
    )


def test_latency_counts_from_schedule_not_from_send() -> None:
    r = rec(0, 1.0, 1.5, [2.0, 2.1, 2.2, 2.4], 4)
    assert r.ttft == pytest.approx(1.0)  # not 0.5: the client's lag is part of the latency
    assert r.send_lag == pytest.approx(0.5)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itl() == pytest.approx([0.1, 0.1, 0.2])
    assert r.e2e == pytest.approx(1.41)


def test_itl_spreads_multi_token_chunks_over_their_tokens() -> None:
    r = rec(0, 0.0, 0.0, [1.0, 1.2, 1.4], 5)  # 3 chunks carried 5 tokens
    assert r.itl() == pytest.approx([0.1, 0.1, 0.1, 0.1])
    assert r.tpot == pytest.approx(0.1)
    assert r.tokens_in(0, 1.1) == pytest.approx(5 / 3)
    # one missing event in many is not multi-token streaming: gaps stay as measured
    near = rec(1, 0.0, 0.0, [1.0 + 0.1 * i for i in range(10)], 11)
    assert near.itl() == pytest.approx([0.1] * 9)


def test_percentiles_match_the_linear_definition() -> None:
    p = percentiles([float(v) for v in range(1, 101)], (50, 90, 99, 99.9))
    assert p["p50"] == pytest.approx(50.5)
    assert p["p90"] == pytest.approx(90.1)
    assert p["p99"] == pytest.approx(99.01)
    assert p["p99.9"] == pytest.approx(99.901)
    assert p["n"] == 100
    assert percentiles([], (50,))["p50"] is None


def test_summary_window_goodput_and_errors() -> None:
    records = [
        rec(0, 0.5, 0.5, [0.7, 0.8], 2),  # warm-up: outside the window
        rec(1, 1.0, 1.0, [1.2, 1.3, 1.4], 3),  # TTFT 200 ms: good
        rec(2, 2.0, 2.0, [2.9, 3.0, 3.1], 3),  # TTFT 900 ms: misses the SLO
        rec(3, 3.0, 3.0, [], 0, status=500, error_kind="http_5xx"),
        rec(4, 5.5, 5.5, [5.6], 1),  # cool-down: outside
    ]
    s = summarize(records, 1.0, 5.0, slo=SLO(ttft=0.5))
    assert s["requests"] == 3 and s["completed"] == 2
    assert s["errors"] == {"http_5xx": 1}
    assert s["error_rate"] == pytest.approx(1 / 3)
    assert s["ttft_ms"]["p50"] == pytest.approx(550)
    assert s["goodput_share"] == pytest.approx(1 / 3)
    assert s["goodput_req_s"] == pytest.approx(1 / 4)
    assert s["output_tok_s"] == pytest.approx(6 / 4)  # tokens produced inside [1, 5]
    assert s["req_s"] == pytest.approx(2 / 4)
    assert s["total_tok_s"] == pytest.approx((6 + 20) / 4)


def test_slo_limits() -> None:
    r = rec(0, 0.0, 0.0, [0.3, 0.4, 0.5], 3)
    assert r.tpot == pytest.approx(0.1)
    assert SLO(ttft=0.3, tpot=0.11, e2e=0.52).met(r)
    assert not SLO(ttft=0.29).met(r)
    assert not SLO(tpot=0.09).met(r)
    assert not SLO(e2e=0.5).met(r)
    assert not SLO().met(rec(1, 0, 0, [], 0, error_kind="timeout"))
    assert SLO(ttft=0.25, tpot=0.1).describe() == "TTFT <= 250 ms, TPOT <= 100 ms"


@pytest.mark.parametrize("burstiness", [1.0, 4.0, 0.5])
def test_arrivals_have_the_asked_rate_and_dispersion(burstiness: float) -> None:
    offsets = arrival_offsets(50.0, count=20000, burstiness=burstiness, seed=1)
    gaps = [b - a for a, b in zip([0.0, *offsets], offsets, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert cv == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert offsets == sorted(offsets)
    assert offsets == arrival_offsets(50.0, count=20000, burstiness=burstiness, seed=1)


def test_arrivals_bounds() -> None:
    by_time = arrival_offsets(100.0, duration=10.0, seed=2)
    assert max(by_time) <= 10.0
    assert len(by_time) == pytest.approx(1000, rel=0.1)
    assert arrival_offsets(math.inf, count=5) == [0.0] * 5
    assert len(arrival_offsets(1000.0, count=7, duration=100)) == 7
    with pytest.raises(ValueError):
        arrival_offsets(0, count=1)
    with pytest.raises(ValueError):
        arrival_offsets(1.0)


def test_length_distributions() -> None:
    import random

    rng = random.Random(0)
    assert {LengthDist.parse("128").sample(rng) for _ in range(10)} == {128}
    uni = [LengthDist.parse("uniform:10:20").sample(rng) for _ in range(2000)]
    assert min(uni) == 10 and max(uni) == 20
    normal = [LengthDist.parse("normal:100:10").sample(rng) for _ in range(4000)]
    assert statistics.mean(normal) == pytest.approx(100, rel=0.02)
    logn = [LengthDist.parse("lognormal:200:0.5").sample(rng) for _ in range(4000)]
    assert statistics.median(logn) == pytest.approx(200, rel=0.05)
    for bad in ("x", "uniform:20:10", "gauss:1:2", "normal:5"):
        with pytest.raises(ValueError):
            LengthDist.parse(bad)


def _summary(**over) -> dict:
    base = {
        "send_lag_ms": {"p99": 1.0},
        "ttft_ms": {"n": 2000},
        "requests": 2000,
        "error_rate": 0.0,
        "errors": {},
    }
    return base | over


def test_verdict_passes_a_clean_run() -> None:
    v = judge(_summary(), RunFacts(bucket_tok_s=[100, 105, 98, 101]), (50, 99), Thresholds())
    assert v == {"status": "pass", "reasons": []}


@pytest.mark.parametrize(
    ("summary", "facts", "needle"),
    [
        (_summary(send_lag_ms={"p99": 80.0}), RunFacts(), "p99 send lag 80.0 ms"),
        (_summary(), RunFacts(loop_lag_p99_ms=60), "event-loop lag"),
        (_summary(), RunFacts(client_cpu_share=0.97), "97% of a core"),
        (_summary(), RunFacts(open_loop=True, due=100, sent_on_time=80), "sent 80 of 100"),
        (_summary(), RunFacts(bucket_tok_s=[10, 100, 100, 100]), "never reached a steady"),
        (
            _summary(),
            RunFacts(ttft_first_quarter_ms=200, ttft_last_quarter_ms=2000),
            "a queue is building",
        ),
        (_summary(ttft_ms={"n": 120}), RunFacts(), "p99 needs 500"),
        (
            _summary(error_rate=0.05, errors={"timeout": 100}),
            RunFacts(),
            "5.0% of requests failed",
        ),
        (_summary(), RunFacts(cache_hit_rate=0.6), "unexpected cache hits: 60%"),
        (_summary(requests=0), RunFacts(), "no requests fell inside"),
    ],
)
def test_verdict_rules_warn_with_a_reason(summary: dict, facts: RunFacts, needle: str) -> None:
    v = judge(summary, facts, (50, 99), Thresholds())
    assert v["status"] == "warn"
    assert any(needle in r for r in v["reasons"]), v["reasons"]


def test_cache_hits_are_fine_when_asked_for() -> None:
    facts = RunFacts(cache_hit_rate=0.9, expect_cache_hits=True)
    assert judge(_summary(), facts, (50,), Thresholds())["status"] == "pass"


def _point(value: float, share: float, req_s: float, status: str = "pass") -> dict:
    return {
        "load": {"value": value},
        "summary": {"goodput_share": share, "req_s": req_s, "output_tok_s": req_s * 100},
        "verdict": {"status": status},
    }


def test_limit_is_last_pass_and_first_fail() -> None:
    points = [_point(8, 0.5, 4.0), _point(1, 1.0, 1.0), _point(2, 0.99, 1.9), _point(4, 0.96, 3)]
    limit = find_limit(points, 0.95)
    assert limit.last_pass["load"]["value"] == 4 and limit.first_fail["load"]["value"] == 8
    assert limit.per_replica_req_s == 3 and limit.per_replica_output_tok_s == 300
    strict = find_limit([*points[1:3], _point(4, 0.96, 3, "warn")], 0.95, require_valid=True)
    assert strict.last_pass["load"]["value"] == 2 and strict.first_fail["load"]["value"] == 4
    assert find_limit(points[1:3], 0.95).first_fail is None
    assert find_limit([_point(1, 0.2, 1.0)], 0.95).last_pass is None


def test_replicas_and_cost() -> None:
    assert replicas_needed(10, 3, 0.0) == 4
    assert replicas_needed(9, 3, 0.0) == 3
    assert replicas_needed(10, 3, 0.3) == 5  # 10 / 2.1 = 4.76
    with pytest.raises(ValueError):
        replicas_needed(1, 0, 0.1)
    with pytest.raises(ValueError):
        replicas_needed(1, 1, 1.0)
    assert mix_factor(100, 200) == 0.5 and mix_factor(100, None) == 1.0
    c = cost(2.0, 2, 5, peak_req_s=10, output_tokens_per_request=100, limit_output_tok_s=500)
    assert c.usd_per_hour == 20 and c.usd_per_month == 20 * 730
    assert c.usd_per_1m_output_tokens == pytest.approx(20 / 3.6e6 * 1e6)  # 3.6M tokens/hour
    assert c.usd_per_1k_requests == pytest.approx(20 / 36000 * 1000)
    assert c.usd_per_1m_output_tokens_at_limit == pytest.approx(4 / 1.8e6 * 1e6)


def test_reports_never_record_the_api_key() -> None:
    from benchmarks.bench import _redacted

    argv = ["tiergate", "bench", "--model", "m", "--api-key", "sk-1", "--api-key=sk-2"]
    assert _redacted(argv) == ["--model", "m", "--api-key", "***", "--api-key=***"]


def test_bootstrap_tells_noise_from_a_shift() -> None:
    import random as _random

    from benchmarks.compare import bootstrap_diff

    rng = _random.Random(3)
    a = [100 + rng.gauss(0, 5) for _ in range(200)]
    same = a[::-1]  # the same values in another order: no difference to find
    shifted = [110 + rng.gauss(0, 5) for _ in range(200)]
    assert not bootstrap_diff(a, same).beyond_noise
    moved = bootstrap_diff(a, shifted)
    assert moved.beyond_noise and 8 < moved.diff < 12 and moved.lo < moved.diff < moved.hi
    assert bootstrap_diff([1.0], shifted) is None  # one sample is no distribution


def test_the_run_bootstrap_counts_drift_between_repeats() -> None:
    """Two sittings of each configuration (means, as for throughput). When each side's
    sittings disagree (drift), the interval over runs includes 0 though one pooled
    sitting would call it a shift; when the sittings agree, the shift is still found."""
    import random as _random

    from benchmarks.compare import bootstrap_diff, bootstrap_runs_diff

    rng = _random.Random(5)

    def sitting(mean: float) -> list[float]:
        return [mean + rng.gauss(0, 2) for _ in range(150)]

    a_runs, b_runs = [sitting(100), sitting(112)], [sitting(104), sitting(116)]
    mean = statistics.mean
    pooled = bootstrap_diff([x for r in a_runs for x in r], [x for r in b_runs for x in r], mean)
    assert pooled.beyond_noise  # within-run noise alone: "B is higher"
    drift = bootstrap_runs_diff(a_runs, b_runs, mean)
    assert not drift.beyond_noise and drift.lo < 0 < drift.hi
    steady = bootstrap_runs_diff([sitting(100), sitting(101)], [sitting(110), sitting(111)], mean)
    assert steady.beyond_noise and 8 < steady.diff < 12
    assert bootstrap_runs_diff([[1.0], []], b_runs) is None  # one sample is no distribution


def _run(ttft: list[float], tok_s: float, buckets: list[float]) -> dict:
    requests = [
        {"measured": True, "error_kind": None, "ttft_ms": t, "tpot_ms": 10.0, "e2e_ms": t + 100}
        for t in ttft
    ]
    summary = {
        "ttft_ms": {"p50": sorted(ttft)[len(ttft) // 2]},
        "tpot_ms": {"p50": 10.0},
        "e2e_ms": {"p50": sorted(ttft)[len(ttft) // 2] + 100},
        "output_tok_s": tok_s,
    }
    point = {
        "load": {"kind": "concurrency", "value": 4},
        "summary": summary,
        "facts": {"bucket_tok_s": buckets},
        "requests": requests,
    }
    return {"meta": {"load_kind": "concurrency"}, "points": [point]}


def test_compare_rows_and_verdict() -> None:
    from benchmarks.compare import compare, markdown, verdict

    a = _run([200 + i % 7 for i in range(60)], 100.0, [99, 101, 100, 100])
    b = _run([150 + i % 7 for i in range(60)], 120.0, [119, 121, 120, 120])
    rows = compare([a, b], ["eager", "compiled"])
    ttft = next(r for r in rows if r["metric"].startswith("TTFT"))
    assert ttft["compiled / eager"] < 0.8 and ttft["compiled beyond noise"]
    tpot = next(r for r in rows if r["metric"].startswith("TPOT"))
    assert tpot["compiled / eager"] == 1.0 and not tpot["compiled beyond noise"]
    tok = next(r for r in rows if r["metric"] == "output tok/s")
    assert tok["compiled / eager"] == 1.2 and tok["compiled beyond noise"]
    lines = verdict(rows, ["eager", "compiled"])
    assert lines[0].startswith("compiled differs from eager beyond noise in TTFT")
    assert "| C=4 | TTFT p50 (ms) |" in markdown(rows, ["eager", "compiled"])


def test_compare_groups_repeats_by_name(tmp_path) -> None:
    """Runs named alike are repeats: one column per configuration (the median over its
    runs), the runs' own values kept, the CSV and page written; folders that share a
    name without --names are refused rather than merged."""
    import json as _json

    from benchmarks.compare import compare, main

    a1 = _run([200 + i % 7 for i in range(60)], 100.0, [99, 101, 100, 100])
    a2 = _run([220 + i % 7 for i in range(60)], 104.0, [103, 105, 104, 104])
    b1 = _run([150 + i % 7 for i in range(60)], 120.0, [119, 121, 120, 120])
    b2 = _run([160 + i % 7 for i in range(60)], 126.0, [125, 127, 126, 126])
    rows = compare([a1, b1, b2, a2], ["eager", "compiled", "compiled", "eager"])
    tok = next(r for r in rows if r["metric"] == "output tok/s")
    assert tok["eager"] == 102.0 and tok["compiled"] == 123.0
    assert tok["eager runs"] == [100.0, 104.0] and tok["compiled runs"] == [120.0, 126.0]
    assert set(tok) >= {"compiled / eager", "compiled CI", "compiled beyond noise"}
    paths = []
    for name, run in [("x", a1), ("y", b1), ("z", b2), ("w", a2)]:
        run["meta"] |= {"command": f"tiergate bench ({name})", "date": "2026-11-26", "host": "h"}
        (tmp_path / name).mkdir()
        (tmp_path / name / "bench.json").write_text(_json.dumps(run))
        paths.append(str(tmp_path / name))
    names = ["eager", "compiled", "compiled", "eager"]
    assert main([*paths, "--names", *names, "--out", str(tmp_path / "out")]) == 0
    assert "eager #2" not in (tmp_path / "out" / "compare.csv").read_text()
    assert "draws runs as well as requests" in (tmp_path / "out" / "compare.html").read_text()
    for d in ("p", "q"):
        (tmp_path / d / "sweep").mkdir(parents=True)
        (tmp_path / d / "sweep" / "bench.json").write_text(_json.dumps(a1))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "p" / "sweep"), str(tmp_path / "q" / "sweep"), "--out", "o"])


def test_the_overhead_study_counts_a_process_syscalls_and_wakeups() -> None:
    before = call_counts(os.getpid())
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        for _ in range(100):
            os.write(fd, b"x")
    finally:
        os.close(fd)
    time.sleep(0.01)  # a sleep is a voluntary context switch
    after = call_counts(os.getpid())
    assert after["writes"] - before["writes"] >= 100
    assert after["reads"] >= before["reads"]
    assert after["wakeups"] > before["wakeups"]


def test_the_cache_probe_holds_each_event_to_its_own_bar(tmp_path) -> None:
    import yaml

    from benchmarks.launch import REPO
    from benchmarks.studies.kill_probe import _until_exited, config, passed

    # a SIGKILL may cut the streams on the dead engine; only a refusal fails it
    kill = {"event": "kill", "requests": 3, "refusals": 0, "outcomes": {"ok": 2, "stream_cut": 1}}
    assert passed(kill)
    assert not passed(kill | {"refusals": 1, "outcomes": {"ok": 2, "refused_503": 1}})
    # a planned restart drains and a clear preempts: every request must come back whole
    for event in ("restart", "clear"):
        assert not passed(kill | {"event": event})
        assert passed(kill | {"event": event, "outcomes": {"ok": 3}})
    shipped = REPO / "configs" / "tiers-cpu.yaml"
    assert config("kill", tmp_path) == config("restart", tmp_path) == shipped
    copy = yaml.safe_load(config("clear", tmp_path).read_text())  # dev endpoints for the reset
    assert [e["env"]["VLLM_SERVER_DEV_MODE"] for e in copy["engines"]] == ["1", "1"]
    assert copy["tiers"] == yaml.safe_load(shipped.read_text())["tiers"]
    # a restart's loss is timed from the old process's exit: a zombie counts as gone
    proc = subprocess.Popen(["sleep", "0.2"])
    try:
        started = time.monotonic()
        assert 0.15 < _until_exited(proc.pid, limit=10) - started < 5
    finally:
        proc.kill()
        proc.wait()


def test_prefix_routing_summary_states_the_claims_ratios() -> None:
    from benchmarks.studies.prefix_routing import summarize

    def row(router: str, ttft: float, later: float | None, tok: float, hit: float) -> dict:
        return {
            "workload": "multiturn", "router": router, "errors": 0, "req_s": tok / 16,
            "out_tok_s": tok, "ttft_p50_ms": ttft, "ttft_p90_ms": 2 * ttft,
            "ttft_p50_later_ms": later, "hit_rate": hit, "max_share": 0.5,
        }  # fmt: skip

    rows = [
        row("tiergate", 600, 400, 39, 0.6),
        row("tiergate", 700, 500, 40, 0.6),
        row("tiergate", 800, 600, 41, 0.6),
        row("round_robin", 1000, 800, 30, 0.45),
        row("cache_aware", 900, 700, 31, 0.45),
        row("ideal", 650, 450, 40, 0.5),
    ]
    ratios = summarize(rows).splitlines()[-1]
    # medians: TTFT 700 / 1,000 and / 900 (the best peer), tok/s 40 / 30, hit 0.6 / 0.5,
    # the later turns' TTFT 500 / 800
    assert ratios == "| multiturn | 0.70 | 0.78 | 1.33 | 1.20 | 0.62 |"
    # a workload without turns has no later-turn column to fill
    single = [r | {"workload": "groups", "ttft_p50_later_ms": None} for r in rows]
    assert summarize(single).splitlines()[-1].endswith("| 1.20 | - |")
