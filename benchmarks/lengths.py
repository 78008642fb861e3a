"""Real request-length distributions: (input, output) token pairs drawn together, so a
long prompt keeps its own answer length.

`sharegpt` is the first round of 20,000 ShareGPT conversations (benchmarks/data/,
provenance in the file's header): prompts median 40 tokens with a tail to 100k+,
answers median 275 with a tail to 30k+. `vllm bench serve --dataset-name sharegpt`
keeps pairs with 4 <= input <= 1024, output >= 4 and input + output <= 2048; so does
`filtered` by default.
"""

from __future__ import annotations

import gzip
import random
import statistics
from dataclasses import dataclass
from importlib import resources

Pair = tuple[int, int]


def load(name: str = "sharegpt") -> list[Pair]:
    """The named table of (input, output) pairs shipped with tiergate."""
    if name != "sharegpt":
        raise ValueError(f"unknown length table {name!r}; known: sharegpt")
    raw = resources.files("benchmarks").joinpath("data/sharegpt_lengths.txt.gz").read_bytes()
    pairs = []
    for line in gzip.decompress(raw).decode().splitlines():
        if line and not line.startswith("#"):
            a, b = line.split()
            pairs.append((int(a), int(b)))
    return pairs


def filtered(pairs: list[Pair], max_input: int = 1024, max_total: int = 2048) -> list[Pair]:
    """The pairs vLLM's ShareGPT benchmark keeps."""
    return [(a, b) for a, b in pairs if 4 <= a <= max_input and b >= 4 and a + b <= max_total]


def means(pairs: list[Pair]) -> tuple[float, float]:
    return statistics.fmean(a for a, _ in pairs), statistics.fmean(b for _, b in pairs)


def rescaled(pairs: list[Pair], mean_input: float, mean_output: float) -> list[Pair]:
    """The same shape with other means: every length times the ratio of the means.

    For a published run that reports its own mean lengths: another tokenizer, or
    answers that stop at EOS before the dataset's length, change the scale of the
    lengths but not the heavy tail that decides how long a burst lasts."""
    mi, mo = means(pairs)
    fi, fo = mean_input / mi, mean_output / mo
    return [(max(1, round(a * fi)), max(1, round(b * fo))) for a, b in pairs]


@dataclass
class PairSampler:
    """Draws pairs at random; `max_total` drops pairs that would not fit the engine."""

    pairs: list[Pair]
    max_total: int | None = None

    def __post_init__(self) -> None:
        if self.max_total:
            self.pairs = [(a, b) for a, b in self.pairs if a + b <= self.max_total]
        if not self.pairs:
            raise ValueError("no length pair fits")

    def sample(self, rng: random.Random) -> Pair:
        return rng.choice(self.pairs)

    def draw(self, n: int, seed: int = 0) -> list[Pair]:
        rng = random.Random(seed)
        return [self.sample(rng) for _ in range(n)]


def parse(spec: str) -> PairSampler:
    """`sharegpt`, `sharegpt:MAX_TOTAL` (drop pairs longer than that, for small engines)
    or `sharegpt:MAX_TOTAL:SCALE` (every length times SCALE first)."""
    name, *rest = spec.split(":")
    pairs = filtered(load(name))  # an unknown name says which names there are
    try:
        max_total = int(rest[0]) if rest else None
        scale = float(rest[1]) if len(rest) > 1 else 1.0
    except ValueError as exc:
        raise ValueError(f"bad length pairs {spec!r}: {parse.__doc__}") from exc
    if scale != 1.0:
        pairs = [(max(4, round(a * scale)), max(4, round(b * scale))) for a, b in pairs]
    return PairSampler(pairs, max_total)
