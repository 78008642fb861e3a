"""Prompt tokens counted with each tier's own tokenizer (never guessed from characters).

The `tokenizers` library and the model's chat template compiled once with jinja2, as
transformers renders it (sandboxed, trim_blocks, lstrip_blocks, `tojson`), but without
importing transformers, and torch with it, into the gateway (600 MB of RSS otherwise).
tests/test_router_units.py checks the counts against transformers' own.

The cost is bounded: text past `exact_chars` is not tokenized; its tokens are estimated
from the tokens-per-character of the part that was, and the count says so (`estimated`).

And most prompts need no tokenizing at all: a token covers at least one byte (byte-level
BPE, SentencePiece with byte fallback), so a text's UTF-8 length (plus a margin for a
BOS added outside it) bounds its token count from above. When that bound is below every
threshold the router compares counts with (`below`), the decision cannot change and
the bound is returned instead (`bounded`): 35 us instead of 145 for a short chat.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

EXACT_CHARS = 32_000  # ~8k tokens: about 2 ms to tokenize on one core
CHEAP_CHARS = 2_000  # below this, counting inline costs less than a thread hop


class TemplateError(Exception):
    """The chat template refused the messages (its own raise_exception)."""


BOUND_MARGIN = 4  # tokens a tokenizer may add that cover no byte of the text (BOS)


@dataclass(frozen=True)
class Count:
    tokens: int
    estimated: bool = False  # a huge prompt's tail was estimated
    bounded: bool = False  # an upper bound, below every threshold that matters
    ids: list[int] | None = None  # the prompt's token ids (the head's, when estimated)


def _special(config: dict[str, Any], name: str) -> str:
    value = config.get(name) or ""
    return value.get("content", "") if isinstance(value, dict) else str(value)


class _Tokenizer:
    """One tokenizer folder: tokenizer.json, tokenizer_config.json, chat template."""

    def __init__(self, folder: Path) -> None:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        source = config.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            source = (folder / "chat_template.jinja").read_text()
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        self.specials = {
            name: _special(config, name)
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        self.template = None
        self.overhead: tuple[int, int] | None = None  # chat_bound's, measured on first use
        if source:

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
            )
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, sort_keys=False: (
                json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
            )
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self.template = env.from_string(source)

    def encode_len(self, text: str, special: bool, below: int = 0) -> Count:
        if below and len(text) + BOUND_MARGIN < below:  # chars <= bytes: cheap pre-check
            bound = len(text.encode()) + BOUND_MARGIN
            if bound < below:
                return Count(bound, bounded=True)
        if len(text) <= EXACT_CHARS:
            ids = self.tokenizer.encode(text, add_special_tokens=special).ids
            return Count(len(ids), ids=ids)
        ids = self.tokenizer.encode(text[:EXACT_CHARS], add_special_tokens=special).ids
        return Count(round(len(ids) * len(text) / EXACT_CHARS), estimated=True, ids=ids)

    def chat_bound(self, payload: dict[str, Any]) -> int | None:
        """An upper bound on the chat's tokens without rendering it (~1 us), or None where
        one cannot be had cheaply (tools, content parts): the messages' UTF-8 bytes plus
        what the template adds, measured once on empty messages, with a margin."""
        if payload.get("tools") or self.template is None:
            return None
        if self.overhead is None:
            self.overhead = self._overhead()
        base, per_message = self.overhead
        size = base + BOUND_MARGIN
        for m in payload["messages"]:
            content = m.get("content") if isinstance(m, dict) else None
            if content is None:
                content = ""
            if not isinstance(content, str):
                return None
            size += per_message + len(content.encode())
        return size

    def _overhead(self) -> tuple[int, int]:
        def size(roles: list[str]) -> int:
            text = self.template.render(
                messages=[{"role": r, "content": ""} for r in roles],
                add_generation_prompt=True,
                **self.specials,
            )
            return len(text.encode())

        base = size(["user"])
        per = max(size(["user", "assistant", "user"]) - base, size(["system", "user"]) - base)
        return base, max(per, 0) // 2 + 32  # a margin for roles and names not tried

    def chat(self, payload: dict[str, Any], below: int = 0) -> Count:
        if self.template is None:
            raise TemplateError("the tokenizer has no chat template")
        text = self.template.render(
            messages=[_flat(m) for m in payload["messages"]],
            tools=payload.get("tools"),
            add_generation_prompt=True,
            **self.specials,
        )
        return self.encode_len(text, special=False, below=below)  # specials are in the text


def _flat(message: Any) -> Any:
    """OpenAI content parts -> one string, as engines do for text-only models."""
    if isinstance(message, dict) and isinstance(message.get("content"), list):
        text = "".join(p.get("text", "") for p in message["content"] if isinstance(p, dict))
        return {**message, "content": text}
    return message


def prompt_chars(payload: dict[str, Any]) -> int:
    """A cheap size of the prompt, to decide where counting runs."""
    if "messages" in payload:
        return sum(
            len(m.get("content") or "") if isinstance(m.get("content"), str) else 1000
            for m in payload["messages"]
            if isinstance(m, dict)
        )
    prompt = payload.get("prompt", "")
    return len(prompt) if isinstance(prompt, str) else 1000 * len(prompt)


class TokenCounter:
    """Counts prompt tokens for a request, per tokenizer folder (loaded once each)."""

    def __init__(self, paths: dict[str, Path]) -> None:
        self.paths = {tier: str(p) for tier, p in paths.items()}
        self._tokenizers: dict[str, _Tokenizer] = {}

    def _tokenizer(self, path: str) -> _Tokenizer:
        if path not in self._tokenizers:
            self._tokenizers[path] = _Tokenizer(Path(path))
        return self._tokenizers[path]

    def warm(self) -> None:
        for path in set(self.paths.values()):
            self._tokenizer(path)

    def is_cheap(self, payload: dict[str, Any]) -> bool:
        return prompt_chars(payload) <= CHEAP_CHARS

    def measure(self, tier: str, payload: dict[str, Any], below: int = 0) -> Count:
        """Prompt tokens of `payload` for `tier`; an upper bound where it is under `below`."""
        tok = self._tokenizer(self.paths[tier])
        if "messages" in payload:
            return tok.chat(payload, below)
        prompt = payload.get("prompt", "")
        if isinstance(prompt, str):
            return tok.encode_len(prompt, special=True, below=below)
        if prompt and isinstance(prompt[0], int):
            return Count(len(prompt))
        counts = [
            Count(len(p)) if isinstance(p[0] if p else None, int) else tok.encode_len(p, True)
            for p in prompt
        ]
        longest = max(counts, key=lambda c: c.tokens, default=Count(0))
        return longest

    def below(self, tier: str, payload: dict[str, Any], tokens: int) -> bool:
        """Whether the prompt has surely fewer than `tokens` tokens, told without
        rendering or tokenizing it (False: it may have more)."""
        if "messages" in payload:
            bound = self._tokenizer(self.paths[tier]).chat_bound(payload)
            return bound is not None and bound < tokens
        prompt = payload.get("prompt")
        if isinstance(prompt, str):
            return len(prompt.encode()) + BOUND_MARGIN < tokens
        return False

    def count(self, tier: str, payload: dict[str, Any]) -> int:
        return self.measure(tier, payload).tokens

    def measure_all(self, payload: dict[str, Any], below: int = 0) -> dict[str, Count]:
        """Each tier's count (upper bounds where under `below`). Tiers sharing a
        tokenizer share the work."""
        by_path: dict[str, Count] = {}
        counts: dict[str, Count] = {}
        for tier, path in self.paths.items():
            if path not in by_path:
                by_path[path] = self.measure(tier, payload, below)
            counts[tier] = by_path[path]
        return counts

    def count_all(self, payload: dict[str, Any], below: int = 0) -> tuple[dict[str, int], bool]:
        """Tokens per tier (upper bounds where under `below`), and whether any count is
        an estimate (a prompt past EXACT_CHARS)."""
        counts = self.measure_all(payload, below)
        return {t: c.tokens for t, c in counts.items()}, any(c.estimated for c in counts.values())
