"""`tiergate eval`'s scoring and reports, and the W8A8 quantizer, on plain values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.quality.evaluate import agreement_report, golden_report, main, render
from benchmarks.quality.scoring import (
    GoldenItem,
    agreement,
    load_golden,
    matching_prefix,
    score_answer,
)


def test_shipped_golden_set_is_well_formed() -> None:
    items = load_golden()
    assert len(items) >= 30
    assert len({i.id for i in items}) == len(items)
    kinds = {i.kind for i in items}
    assert {"fact", "arithmetic", "classification", "json"} <= kinds


def test_golden_set_without_answers_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "g.yaml"
    bad.write_text("items:\n  - {id: x, kind: fact, prompt: hi}\n")
    with pytest.raises(ValueError, match=r"items\.0 \(x\)"):
        load_golden(bad)


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ("The capital of France is Paris.", True),
        ("paris", True),
        ("Comparison of cities", False),  # 'paris' inside a word is not an answer
        ("L'Étoile, la Marseillaise, la femme", False),
        ("", False),
    ],
)
def test_accept_patterns(text: str, passed: bool) -> None:
    item = GoldenItem("capital", "fact", "?", accept=(r"\bParis\b",))
    assert score_answer(item, text)[0] is passed


def test_reject_beats_accept() -> None:
    item = GoldenItem("s", "classification", "?", accept=("positive",), reject=("negative",))
    assert score_answer(item, "Positive.")[0]
    ok, why = score_answer(item, "Positive or negative, hard to say")
    assert not ok and "rejected" in why


@pytest.mark.parametrize(
    ("text", "passed"),
    [
        ('{"city": "Paris"}', True),
        ('Sure! ```json\n{"city": "Paris"}\n```', True),
        ('{"town": "Paris"} and then {"city": "Paris", "extra": 1}', True),
        ('{"city": "Lyon"}', False),
        ('{"city": "Paris"', False),  # truncated
        ("Paris", False),
    ],
)
def test_json_items(text: str, passed: bool) -> None:
    item = GoldenItem("j", "json", "?", json={"city": "Paris"})
    assert score_answer(item, text)[0] is passed


def test_agreement_counts_prefixes_and_first_tokens() -> None:
    assert matching_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert matching_prefix([1, 2], [1, 2, 3]) == 2
    result = agreement([([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 9, 9]), ([5], [6])])
    assert result.prompts == 3
    assert result.exact_match == pytest.approx(1 / 3)
    assert result.first_token_match == pytest.approx(2 / 3)
    assert result.mean_matching_prefix == pytest.approx((3 + 1 + 0) / 3)
    with pytest.raises(ValueError):
        agreement([])


def test_golden_report_passes_and_fails_on_threshold() -> None:
    items = [GoldenItem(f"q{i}", "fact", "?", accept=("yes",)) for i in range(4)]
    got = [{"text": t, "token_ids": None} for t in ("yes", "yes", "yes", "no")]
    report = golden_report(items, got, threshold=0.75)
    assert report["score"] == 0.75 and report["passed"]
    assert [r["passed"] for r in report["items"]] == [True, True, True, False]
    assert not golden_report(items, got, threshold=0.8)["passed"]
    assert "FAIL" in render(golden_report(items, got, threshold=0.8))


def test_a_failed_required_item_fails_the_gate_whatever_the_score() -> None:
    items = [GoldenItem(f"q{i}", "fact", "?", accept=("yes",)) for i in range(3)]
    items.append(GoldenItem("readme", "fact", "?", accept=("Paris",), required=True))
    got = [{"text": t, "token_ids": None} for t in ("yes", "yes", "yes", "Lyon")]
    report = golden_report(items, got, threshold=0.5)
    assert report["score"] == 0.75
    assert not report["passed"] and report["required_failed"] == ["readme"]
    assert "required item failed: readme" in render(report)
    assert any(i.required for i in load_golden())  # the README's question is required


def test_agreement_report_falls_back_to_words_without_token_ids() -> None:
    ref = [{"text": "a b c", "token_ids": None}]
    test = [{"text": "a b d", "token_ids": None}]
    report = agreement_report(ref, test, min_first=0.5, min_prefix=2)
    assert report["unit"] == "words" and report["mean_matching_prefix"] == 2
    assert report["passed"]
    assert not agreement_report(ref, test, min_first=0.5, min_prefix=3)["passed"]


def test_unreachable_endpoint_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", "http://127.0.0.1:9", "--model", "m", "--limit", "1"]) == 2
    assert "tiergate eval: error" in capsys.readouterr().err


def test_quantize_folder_writes_int8_per_channel(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from models.quantize_w8a8 import quantize_folder, quantize_weight

    w = torch.randn(8, 16)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (8, 1)
    assert (q.float() * scale - w).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
            "model.layers.0.input_layernorm.weight": torch.ones(4),
            "model.embed_tokens.weight": torch.randn(10, 4),
        },
        src / "model.safetensors",
    )
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (src / "tokenizer.json").write_text("{}")
    assert quantize_folder(src, out) == 1
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (4, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32  # untouched
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["format"] == "int-quantized"
    assert (out / "tokenizer.json").is_file()
