"""CPU per request of routing by cached prefix, by prompt length (RESULTS.md, "Routing by
cached prefix": its cost on the hot path).

    python -m benchmarks.studies.prefix_cost

For chats of ~100, ~1,000 and ~8,000 prompt tokens, on one core, in this process (no
server): what a request to a two-replica tier pays for its placement, in the steps the
gateway runs (serving/api/serving.py `_placement` and serving/router/planner.py `plan`):
1. tokens: render the chat template and tokenize (skipped under one block by a byte
   bound; under `model: auto` the gateway has this already, from counting);
2. keys: cut the ids into 128-token blocks and hash them;
3. plan: look the keys up in both replicas' indexes (each holding the prompt and 4,000
   other blocks) and rank them by the score.
Needs the default model's tokenizer (a prepared model).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from tokenizers import Tokenizer

from models.manifest import load_manifest
from models.prepare import prepare
from serving.config import load_settings
from serving.router.balancer import Limits
from serving.router.planner import Placement, plan
from serving.router.prefix import block_keys
from serving.router.registry import Endpoint, Tier
from serving.router.tokens import TokenCounter


def _median_us(fn, n: int) -> float:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args(argv)
    settings = load_settings()
    folder = prepare(load_manifest("smollm2-135m-instruct"), settings.model_cache)
    counter = TokenCounter({"t": folder})
    counter.warm()
    rng = random.Random(0)
    vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("Ġ") and w[1:].isalpha())
    a, b = (
        Endpoint("a", "m", url="http://a", ready=True),
        Endpoint("b", "m", url="http://b", ready=True),
    )
    tier = Tier("t", "m", [a, b])
    limits = Limits(8, 0.95, 100)
    filler = [block_keys([rng.randrange(49152) for _ in range(128)], 128)[0] for _ in range(4000)]
    for ep in (a, b):
        ep.prefix.attach_events()
        ep.prefix.blocks.update(dict.fromkeys(filler))
    print("| prompt tokens | tokens (render + encode) | keys | plan | total |")
    print("|---|---|---|---|---|")
    for n_words in (70, 800, 6500):
        text = " ".join(rng.choice(words) for _ in range(n_words))
        chat = {"messages": [{"role": "user", "content": text}]}
        count = counter.measure("t", chat, below=128)
        ids = count.ids or []
        keys = block_keys(ids, 128, 8192 // 128)
        a.prefix.blocks.update(dict.fromkeys(keys))  # a holds this prompt
        placement = Placement({"t": keys})
        t_tokens = _median_us(lambda chat=chat: counter.measure("t", chat, below=128), args.n)
        t_keys = _median_us(lambda ids=ids: block_keys(ids, 128, 8192 // 128), args.n)
        t_plan = _median_us(
            lambda placement=placement: plan(tier, [], [], limits, 0.0, placement, 3, 1), args.n
        )
        print(
            f"| {count.tokens:,} | {t_tokens:,.0f} us | {t_keys:,.1f} us | {t_plan:,.1f} us "
            f"| {t_tokens + t_keys + t_plan:,.0f} us |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
