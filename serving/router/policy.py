"""Which tier serves `model: "auto"`: a pure function of the request's features.

Every decision carries a reason; it goes back to the client in `x-tiergate-reason`
and into the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from serving.config import RulesSettings
from serving.errors import InvalidRequest


@dataclass(frozen=True)
class Features:
    prompt_tokens: Mapping[str, int]  # by tier: each tier counts with its own tokenizer
    max_tokens: int | None = None
    has_tools: bool = False
    has_response_format: bool = False
    hint: str | None = None  # header x-tiergate-tier or metadata.tier


@dataclass(frozen=True)
class TierView:
    name: str
    max_context: int | None = None
    max_output_tokens: int | None = None

    def fits(self, f: Features) -> bool:
        need = f.prompt_tokens[self.name] + (f.max_tokens or 1)
        if self.max_context is not None and need > self.max_context:
            return False
        return not (
            self.max_output_tokens is not None
            and f.max_tokens is not None
            and f.max_tokens > self.max_output_tokens
        )


@dataclass(frozen=True)
class Decision:
    tier: str
    reason: str


def choose_tier(f: Features, tiers: list[TierView], rules: RulesSettings) -> Decision:
    """Rules, first match wins: hint, tools, long prompt, long output, default.

    A rule's tier is skipped when the request does not fit it (context or output
    limit); then the first tier in config order that fits is used ("fit").
    """
    by_name = {t.name: t for t in tiers}
    if f.hint is not None:
        if f.hint not in by_name:
            raise InvalidRequest(
                f"Unknown tier hint {f.hint!r}; tiers: {', '.join(by_name)}", param="metadata.tier"
            )
        return Decision(f.hint, "hint")

    def fitting(name: str | None) -> bool:  # a rule's tier may be outside the caller's
        return name is not None and name in by_name and by_name[name].fits(f)

    if (f.has_tools or f.has_response_format) and fitting(rules.tools_tier):
        return Decision(rules.tools_tier, "tools")  # type: ignore[arg-type]
    long_tier = rules.long_prompt_tier
    if fitting(long_tier) and f.prompt_tokens[long_tier] >= rules.long_prompt_tokens:
        return Decision(long_tier, "long_prompt")  # type: ignore[arg-type]
    if (f.max_tokens or 0) >= rules.long_output_tokens and fitting(rules.long_output_tier):
        return Decision(rules.long_output_tier, "long_output")  # type: ignore[arg-type]
    default = rules.default_tier if rules.default_tier in by_name else tiers[0].name
    if fitting(default):
        return Decision(default, "default")
    for tier in tiers:
        if tier.fits(f):
            return Decision(tier.name, "fit")
    largest = max(tiers, key=lambda t: t.max_context or 0)
    return Decision(largest.name, "too_long")  # the engine will answer with its limit
