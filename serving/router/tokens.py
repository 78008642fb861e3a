"""Prompt tokens counted with each tier's own tokenizer (never guessed from characters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class TokenCounter:
    """Counts prompt tokens for a request, per tokenizer folder (loaded once each)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = {tier: str(p) for tier, p in paths.items()}
        self._tokenizers: dict[str, Any] = {}

    def _tokenizer(self, path: str) -> Any:
        if path not in self._tokenizers:
            from transformers import AutoTokenizer

            self._tokenizers[path] = AutoTokenizer.from_pretrained(path)
        return self._tokenizers[path]

    def warm(self) -> None:
        for path in set(self.paths.values()):
            self._tokenizer(path)

    def count(self, tier: str, payload: dict[str, Any]) -> int:
        tok = self._tokenizer(self.paths[tier])
        if "messages" in payload:
            ids = tok.apply_chat_template(
                payload["messages"], tokenize=True, add_generation_prompt=True, return_dict=False
            )
            return len(ids)
        prompt = payload.get("prompt", "")
        if isinstance(prompt, str):
            return len(tok.encode(prompt, add_special_tokens=True))
        if prompt and isinstance(prompt[0], int):
            return len(prompt)
        return max(
            (
                len(p) if isinstance(p[0] if p else None, int) else len(tok.encode(p))
                for p in prompt
            ),
            default=0,
        )

    def count_all(self, payload: dict[str, Any]) -> dict[str, int]:
        """Per tier; tiers sharing a tokenizer folder share the work."""
        by_path: dict[str, int] = {}
        counts = {}
        for tier, path in self.paths.items():
            if path not in by_path:
                by_path[path] = self.count(tier, payload)
            counts[tier] = by_path[path]
        return counts
