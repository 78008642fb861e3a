"""Pure scoring for `tiergate eval`: the golden set, one answer's verdict, and how far two
engines' greedy answers agree. No I/O beyond reading the golden set's YAML."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

GOLDEN = Path(__file__).with_name("golden.yaml")


@dataclass(frozen=True)
class GoldenItem:
    id: str
    kind: str
    prompt: str
    accept: tuple[str, ...] = ()
    reject: tuple[str, ...] = ()
    json: dict[str, Any] = field(default_factory=dict)
    required: bool = False  # the gate fails if this item fails, whatever the score

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def load_golden(path: Path = GOLDEN) -> list[GoldenItem]:
    items = []
    for i, raw in enumerate(yaml.safe_load(path.read_text())["items"]):
        item = GoldenItem(
            id=raw["id"],
            kind=raw["kind"],
            prompt=raw["prompt"],
            accept=tuple(raw.get("accept", ())),
            reject=tuple(raw.get("reject", ())),
            json=raw.get("json") or {},
            required=bool(raw.get("required", False)),
        )
        if not (item.accept or item.json):
            raise ValueError(f"{path}: items.{i} ({item.id}) has neither accept nor json")
        items.append(item)
    return items


def _json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object embedded in `text` (models wrap them in prose or code fences)."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        try:
            value, end = decoder.raw_decode(text, i)
        except ValueError:
            i = text.find("{", i + 1)
            continue
        if isinstance(value, dict):
            found.append(value)
        i = text.find("{", end)
    return found


def score_answer(item: GoldenItem, text: str) -> tuple[bool, str]:
    """(passed, why) for one answer."""
    if item.json:
        for obj in _json_objects(text):
            if all(obj.get(k) == v for k, v in item.json.items()):
                return True, "json fields match"
        return False, f"no JSON object with {item.json}"
    for pattern in item.reject:
        if re.search(pattern, text, re.IGNORECASE):
            return False, f"rejected by /{pattern}/"
    for pattern in item.accept:
        if re.search(pattern, text, re.IGNORECASE):
            return True, f"matched /{pattern}/"
    return False, "no accepted answer found"


@dataclass(frozen=True)
class Agreement:
    prompts: int
    exact_match: float  # share of identical greedy answers
    first_token_match: float
    mean_matching_prefix: float  # in tokens (or words when the server gives no token ids)
    median_matching_prefix: float


def matching_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def agreement(pairs: Sequence[tuple[Sequence[Any], Sequence[Any]]]) -> Agreement:
    """How far the test engine's answers follow the reference's, pair by pair."""
    if not pairs:
        raise ValueError("no answers to compare")
    prefixes = [matching_prefix(ref, test) for ref, test in pairs]
    return Agreement(
        prompts=len(pairs),
        exact_match=sum(ref == test for ref, test in pairs) / len(pairs),
        first_token_match=sum(bool(r) and bool(t) and r[0] == t[0] for r, t in pairs) / len(pairs),
        mean_matching_prefix=statistics.mean(prefixes),
        median_matching_prefix=statistics.median(prefixes),
    )
