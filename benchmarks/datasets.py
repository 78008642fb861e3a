"""What to send: synthetic prompts of exact token lengths, shared-prefix prompts,
ShareGPT conversations and multi-turn sessions.

Lengths are in the model's own tokens. Synthetic text is built from words that are
exactly one token each (with their leading space), so a prompt of n such words is
n tokens; each prompt is checked by re-encoding it.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.lengths import PairSampler

_WORD = re.compile(r"^ [a-z]{3,10}$")


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def get_vocab(self) -> dict[str, int]: ...


@dataclass
class RequestSpec:
    """One request: `text` is the new user input; `history` the earlier turns."""

    text: str
    input_tokens: int  # of `text` alone (completions) or of the whole chat (chat)
    output_tokens: int
    history: list[dict[str, str]] = field(default_factory=list)
    session: str | None = None
    turn: int = 0
    body: bytes | None = None  # the encoded request, when made ahead of the run

    def messages(self) -> list[dict[str, str]]:
        return [*self.history, {"role": "user", "content": self.text}]


Session = list[RequestSpec]  # turns, sent one after another


@dataclass(frozen=True)
class LengthDist:
    """`128` (fixed), `uniform:LO:HI`, `normal:MEAN:STD` or `lognormal:MEDIAN:SIGMA`."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        parts = str(spec).split(":")
        try:
            if len(parts) == 1:
                return cls("fixed", int(parts[0]))
            kind, a, b = parts[0], float(parts[1]), float(parts[2])
        except (ValueError, IndexError) as exc:
            raise ValueError(f"bad length spec {spec!r}: {cls.__doc__}") from exc
        if kind not in ("uniform", "normal", "lognormal"):
            raise ValueError(f"bad length spec {spec!r}: {cls.__doc__}")
        if kind == "uniform" and not 1 <= a <= b:
            raise ValueError(f"bad length spec {spec!r}: need 1 <= LO <= HI")
        return cls(kind, a, b)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            value = self.a
        elif self.kind == "uniform":
            value = rng.randint(int(self.a), int(self.b))
        elif self.kind == "normal":
            value = rng.gauss(self.a, self.b)
        else:
            value = rng.lognormvariate(0.0, self.b) * self.a
        return max(1, round(value))

    @property
    def mean(self) -> float:
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a  # lognormal: the median


class SyntheticText:
    """Random text of an exact token count, from single-token words of the vocabulary."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tok = tokenizer
        words = []
        for piece, token_id in tokenizer.get_vocab().items():
            text = tokenizer.decode([token_id])
            if _WORD.match(text) and tokenizer.encode(text, add_special_tokens=False) == [token_id]:
                words.append(text)
            del piece
        if len(words) < 1000:
            raise ValueError(f"tokenizer has only {len(words)} single-token words; need 1000")
        self.words = sorted(words)

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def make(self, n: int, rng: random.Random, prefix: str = "") -> str:
        """`prefix` + words, n tokens in all (the prefix's tokens included)."""
        need = n - (self.count(prefix) if prefix else 0)
        if need < 0:
            raise ValueError(f"prefix is longer than {n} tokens")
        for _ in range(20):
            text = prefix + "".join(rng.choice(self.words) for _ in range(need))
            if self.count(text) == n:
                return text
        raise ValueError(f"could not build a text of exactly {n} tokens")


@dataclass
class ChatTemplate:
    """Tokens the chat template adds around a single user message."""

    tokenizer: Any

    def overhead(self) -> int:
        return self.prompt_tokens([{"role": "user", "content": ""}])

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        ids = self.tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        return len(ids)


def synthetic(
    text: SyntheticText,
    n: int | None,
    input_len: LengthDist,
    output_len: LengthDist,
    *,
    seed: int = 0,
    shared_prefix: int = 0,
    turns: int = 1,
    chat: ChatTemplate | None = None,
    pairs: PairSampler | None = None,
    groups: int = 0,
    group_prefix: int = 0,
    session_ids: str = "session",
    turn_len: LengthDist | None = None,
) -> Iterator[Session]:
    """Up to `n` sessions (None: endless) of `turns` turns each, made as they are drawn.

    Every prompt opens with its own random words, so none shares a prefix-cache
    block with another by accident, unless `shared_prefix` tokens are asked for: then
    every session starts with the same words, on purpose. With `chat`, input lengths
    count the whole templated conversation, as the server's `usage` does. With
    `pairs`, each turn's input and output lengths are drawn together from real requests.
    With `turn_len`, later turns add a user message of that length to the history (which
    then grows each turn, as in SGLang's multi-turn bench); without it, `input_len` is
    each turn's whole conversation.

    With `groups` (chat), requests come in rounds, each group once a round in a random
    order (a fixed order would let round robin partition the groups by luck): each
    group has a system prompt of `group_prefix` tokens of its own, after the
    `shared_prefix` preamble common to all groups (SGLang's generated-shared-prefix,
    inference-perf's shared_prefix); `input_len` is then the user turn's own length.
    `session_ids`: what x-session-id carries: "session" (each multi-turn session),
    "group" (the group: an ideal partition) or "none".
    """
    rng = random.Random(seed)
    common = text.make(shared_prefix, rng) if shared_prefix else ""
    systems = [text.make(shared_prefix + group_prefix, rng, prefix=common) for _ in range(groups)]
    overhead = chat.overhead() if chat else 0
    seen: set[str] = set()
    order: list[int] = []
    for s in itertools.count() if n is None else range(n):
        if groups:
            if not order:  # each round every group once, in a new random order
                order = rng.sample(range(groups), groups)
            g = order.pop()
            yield _group_turn(
                text, rng, g, systems[g], input_len, output_len, chat, session_ids, seen
            )
            continue
        history: list[dict[str, str]] = []
        session: Session = []
        for turn in range(turns):
            target, out = pairs.sample(rng) if pairs else (input_len.sample(rng), 0)
            if turn and turn_len:  # the message's own length: no need to count the history
                content_len = turn_len.sample(rng)
            else:
                before = chat.prompt_tokens(history) - overhead if chat and history else 0
                content_len = max(target - overhead - before, shared_prefix + 4 if turn == 0 else 4)
            prefix = common if turn == 0 else ""
            while True:
                body = text.make(content_len, rng, prefix=prefix)
                head = body[len(prefix) : len(prefix) + 64]
                if turn > 0 or head not in seen:
                    seen.add(head)
                    break
            out = out or output_len.sample(rng)
            spec = RequestSpec(
                text=body,
                input_tokens=content_len,
                output_tokens=out,
                history=list(history),
                session=f"s{s}" if turns > 1 and session_ids == "session" else None,
                turn=turn,
            )
            if chat:
                spec.input_tokens = chat.prompt_tokens(spec.messages())
            session.append(spec)
            if turn + 1 < turns:
                history += [
                    {"role": "user", "content": body},
                    {"role": "assistant", "content": text.make(out, rng)},
                ]
        yield session


def _group_turn(
    text: SyntheticText,
    rng: random.Random,
    group: int,
    system: str,
    input_len: LengthDist,
    output_len: LengthDist,
    chat: ChatTemplate | None,
    session_ids: str,
    seen: set[str],
) -> Session:
    """One request of a shared-prefix group: the group's system prompt, a new question."""
    while True:
        question = text.make(input_len.sample(rng), rng)
        if question[:64] not in seen:
            seen.add(question[:64])
            break
    spec = RequestSpec(
        text=question,
        input_tokens=0,
        output_tokens=output_len.sample(rng),
        history=[{"role": "system", "content": system}],
        session=f"g{group}" if session_ids == "group" else None,
    )
    spec.input_tokens = chat.prompt_tokens(spec.messages()) if chat else 0
    return [spec]


def sharegpt(
    path: Path,
    tokenizer: Tokenizer,
    n: int,
    *,
    seed: int = 0,
    turns: int = 1,
    max_input: int = 1024,
    max_total: int = 2048,
) -> list[Session]:
    """Conversations from a ShareGPT-format JSON file (a list of {"conversations": [...]}).

    The recorded answer's length sets `max_tokens`; later turns carry the recorded
    answers as history. Entries too short (< 4 tokens) or too long are skipped,
    as `vllm bench serve` does.
    """
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    sessions: list[Session] = []
    for i, entry in enumerate(data):
        convo = entry.get("conversations") or entry.get("conversation") or []
        pairs = [
            (a.get("value", ""), b.get("value", ""))
            for a, b in zip(convo[::2], convo[1::2], strict=False)
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "assistant")
        ][:turns]
        session: Session = []
        history: list[dict[str, str]] = []
        for turn, (question, answer) in enumerate(pairs):
            q = len(tokenizer.encode(question, add_special_tokens=False))
            a = len(tokenizer.encode(answer, add_special_tokens=False))
            if q < 4 or a < 4 or q > max_input or q + a > max_total:
                break
            session.append(
                RequestSpec(
                    text=question,
                    input_tokens=q,
                    output_tokens=a,
                    history=list(history),
                    session=f"sharegpt-{i}" if turns > 1 else None,
                    turn=turn,
                )
            )
            history += [
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ]
        if session:
            sessions.append(session)
        if len(sessions) == n:
            break
    if not sessions:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return sessions
