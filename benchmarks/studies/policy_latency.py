"""Added latency of the `auto` policy per request: token counting plus the rules.

    python -m benchmarks.studies.policy_latency --config configs/tiers-cpu.yaml

Needs the tiers' tokenizers (prepared models); talks to no server.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from models.manifest import load_manifest
from models.prepare import prepare
from serving.config import load_settings
from serving.router.policy import Features, TierView, choose_tier
from serving.router.tokens import TokenCounter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=Path("configs/tiers-cpu.yaml"))
    p.add_argument("--n", type=int, default=300)
    args = p.parse_args(argv)
    settings = load_settings(args.config)
    engines = {e.name: e for e in settings.engines}
    tiers = settings.effective_tiers()
    paths = {
        t.name: t.tokenizer
        or prepare(load_manifest(engines[t.engines[0]].model), settings.model_cache)
        for t in tiers
    }
    counter = TokenCounter(paths)
    counter.warm()
    views = [TierView(t.name, t.limits.max_context, t.limits.max_output_tokens) for t in tiers]
    print("| prompt | p50 | p99 |")
    print("|---|---|---|")
    for words in (50, 500, 1500):
        payload = {"messages": [{"role": "user", "content": "lantern river " * (words // 2)}]}
        samples = []
        for _ in range(args.n):
            start = time.perf_counter()
            counts = counter.count_all(payload)
            choose_tier(Features(prompt_tokens=counts, max_tokens=64), views, settings.router.rules)
            samples.append((time.perf_counter() - start) * 1000)
        samples.sort()
        p99 = samples[int(0.99 * (len(samples) - 1))]
        print(
            f"| {words} words ({counts[tiers[0].name]} tokens) | "
            f"{statistics.median(samples):.3f} ms | {p99:.3f} ms |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
