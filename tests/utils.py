"""Test helpers: configs derived from the shipped default, and the server launcher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from benchmarks.launch import REPO, GatewayProcess, free_port

DEFAULT_CONFIG = REPO / "configs" / "default.yaml"

__all__ = [
    "DEFAULT_CONFIG",
    "REPO",
    "GatewayProcess",
    "default_engine",
    "free_port",
    "write_config",
]


def write_config(path: Path, **changes: Any) -> Path:
    """configs/default.yaml with top-level keys replaced; returns the new file."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def default_engine(**changes: Any) -> dict[str, Any]:
    engine = yaml.safe_load(DEFAULT_CONFIG.read_text())["engines"][0]
    engine.update(changes)
    return engine
