"""The golden gate (`tiergate eval`) on every CPU engine config that ships, for real.

On this host the default serves what serving/engines/cpu.py picks (quality first, then
speed); the fallback config (the manifest's own weights, no host variant) is checked too
where it differs. A failing gate exits 1, an unreachable or garbled endpoint exits 2.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.manifest import load_manifest
from serving.engines.cpu import engine_choice
from tests.fake_engine import FakeEngine
from tests.utils import REPO, GatewayProcess, default_engine, write_config

MODEL = "smollm2-135m-instruct"


def run_eval(url: str, out: Path, *args: str) -> tuple[int, dict | None, str]:
    cmd = [sys.executable, "-m", "serving.cli", "eval", "--base-url", url, "--model", MODEL]
    proc = subprocess.run(
        [*cmd, "--json", str(out), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(out.read_text()) if out.is_file() else None
    return proc.returncode, report, proc.stdout + proc.stderr


def check_passes(url: str, out: Path, manifest: str) -> dict:
    threshold = load_manifest(manifest).gate_min_score
    code, report, text = run_eval(url, out, "--threshold", str(threshold))
    print(text)  # the per-item table, in the test's output
    assert code == 0, text
    assert report["passed"] and report["required_failed"] == []
    assert report["score"] >= threshold
    assert len(report["items"]) >= 30 and all(r["text"] for r in report["items"])
    return report


def test_default_config_passes_the_golden_gate(gateway: GatewayProcess, tmp_path: Path) -> None:
    choice = engine_choice(MODEL, default_engine()["args"], True)
    log = gateway.log_path.read_text()
    # the supervisor served what the rule picks for this host, and said why
    assert f"--dtype {choice.dtype}" in log
    assert re.search(rf"--model \S*/{re.escape(choice.model)} ", log)
    assert f"engine dtype {choice.dtype}:" in log
    print(f"default on this host: {choice.model}, {choice.dtype} ({choice.why})")
    check_passes(gateway.url, tmp_path / "gate.json", choice.model)


def test_fallback_config_passes_the_golden_gate(tmp_path: Path) -> None:
    choice = engine_choice(MODEL, default_engine()["args"], True)
    if choice.model == MODEL:
        pytest.skip("the default already serves the manifest's own weights on this host")
    engine = default_engine(host_variant=False)
    engine["env"]["VLLM_CPU_KVCACHE_SPACE"] = "1"
    config = write_config(tmp_path / "fallback.yaml", engines=[engine])
    with GatewayProcess(config, tmp_path / "serve.log") as gw:
        gw.wait_ready()
        fallback = engine_choice(MODEL, engine["args"], False)
        assert f"--dtype {fallback.dtype}" in gw.log_path.read_text()
        check_passes(gw.url, tmp_path / "gate.json", MODEL)
    assert not gw.survivors()


def test_a_golden_set_the_engine_cannot_answer_fails_with_exit_1(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    golden = tmp_path / "golden.yaml"
    golden.write_text(
        yaml.safe_dump(
            {
                "items": [
                    {"id": "pi", "kind": "fact", "prompt": "What is 2 + 2?", "accept": ["^xyzzy$"]},
                    {"id": "ok", "kind": "fact", "prompt": "Say hi.", "accept": ["."]},
                ]
            }
        )
    )
    code, report, text = run_eval(gateway.url, tmp_path / "r.json", "--golden", str(golden))
    assert code == 1, text
    assert report["score"] == 0.5 and not report["passed"]
    assert "FAIL" in text


def test_agreement_of_the_engine_with_itself_is_total(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    code, report, text = run_eval(
        gateway.url, tmp_path / "a.json", "--reference-url", gateway.url, "--limit", "8"
    )
    assert code == 0, text
    assert report["mode"] == "agreement" and report["unit"] == "tokens"  # vLLM's token ids
    assert report["exact_match"] == 1.0 and report["first_token_match"] == 1.0


def test_a_garbled_endpoint_exits_2_and_says_why(tmp_path: Path) -> None:
    with FakeEngine(force="garbage") as fake:  # a FAKE engine: answers that are not JSON
        code, report, text = run_eval(fake.url, tmp_path / "g.json", "--limit", "2")
    assert code == 2 and report is None
    assert "tiergate eval: error" in text and fake.url in text
