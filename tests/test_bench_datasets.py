"""Synthetic prompts have exact token lengths in the model's own tokenizer."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from benchmarks.datasets import ChatTemplate, LengthDist, SyntheticText, sharegpt, synthetic
from models.manifest import load_manifest
from models.prepare import prepare


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from serving.config import Settings

    cache = Settings.model_fields["model_cache"].default_factory()
    folder = prepare(load_manifest("smollm2-135m-instruct"), cache)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def text(tokenizer) -> SyntheticText:
    return SyntheticText(tokenizer)


def count(tokenizer, s: str) -> int:
    return len(tokenizer.encode(s, add_special_tokens=False))


def test_exact_lengths_from_distributions(text: SyntheticText, tokenizer) -> None:
    sessions = list(
        synthetic(text, 200, LengthDist.parse("uniform:8:300"), LengthDist.parse("normal:64:16"))
    )
    assert len(sessions) == 200
    for (spec,) in sessions:
        assert count(tokenizer, spec.text) == spec.input_tokens
        assert 8 <= spec.input_tokens <= 300
        assert spec.output_tokens >= 1
    heads = {spec.text.split()[0:4].__str__() for (spec,) in sessions}
    assert len(heads) == 200  # unique openings: no accidental prefix-cache hits


def test_shared_prefix_is_shared_exactly(text: SyntheticText, tokenizer) -> None:
    sessions = list(
        synthetic(text, 20, LengthDist.parse("96"), LengthDist.parse("8"), shared_prefix=64)
    )
    ids = [tokenizer.encode(s[0].text, add_special_tokens=False) for s in sessions]
    assert all(len(i) == 96 for i in ids)
    assert len({tuple(i[:64]) for i in ids}) == 1
    assert len({tuple(i[64:]) for i in ids}) == 20


def test_chat_lengths_count_the_template(text: SyntheticText, tokenizer) -> None:
    chat = ChatTemplate(tokenizer)
    sessions = list(
        synthetic(text, 5, LengthDist.parse("120"), LengthDist.parse("16"), turns=3, chat=chat)
    )
    for session in sessions:
        assert [s.turn for s in session] == [0, 1, 2]
        assert len({s.session for s in session}) == 1
        assert session[0].input_tokens == 120  # the templated conversation, as usage counts
        for spec in session:
            assert chat.prompt_tokens(spec.messages()) == spec.input_tokens
        assert session[2].history[:2] == session[1].history  # history grows turn by turn
        assert session[1].input_tokens > 120


def test_same_seed_same_data(text: SyntheticText) -> None:
    a = [s[0].text for s in synthetic(text, 5, LengthDist.parse("32"), LengthDist.parse("4"))]
    b = [s[0].text for s in synthetic(text, 5, LengthDist.parse("32"), LengthDist.parse("4"))]
    assert a == b


def test_sharegpt_file(tmp_path, tokenizer) -> None:
    convo = [
        {"from": "human", "value": "Tell me about the river and the stone in the garden."},
        {"from": "gpt", "value": "The river runs past the stone, and the garden grows."},
        {"from": "human", "value": "And what about the lantern by the harbor?"},
        {"from": "gpt", "value": "The lantern glows over the harbor every night."},
    ]
    data = [
        {"id": "a", "conversations": convo},
        {"id": "b", "conversations": convo[:1]},
        {
            "id": "c",
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}],
        },
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    single = sharegpt(path, tokenizer, 10)
    assert len(single) == 1  # "b" has no answer, "c" is under 4 tokens
    spec = single[0][0]
    assert spec.input_tokens == count(tokenizer, convo[0]["value"])
    assert spec.output_tokens == count(tokenizer, convo[1]["value"])
    multi = sharegpt(path, tokenizer, 10, turns=2)
    assert [s.turn for s in multi[0]] == [0, 1]
    assert multi[0][1].history[1]["content"] == convo[1]["value"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="no usable"):
        sharegpt(empty, tokenizer, 1)


def test_too_long_prefix_is_refused(text: SyntheticText) -> None:
    with pytest.raises(ValueError):
        text.make(4, random.Random(0), prefix=text.make(10, random.Random(1)))


def test_real_length_pairs_are_drawn_together(text: SyntheticText, tokenizer) -> None:
    from benchmarks.lengths import parse

    pairs = parse("sharegpt:600")
    sessions = list(
        synthetic(text, 40, LengthDist.parse("128"), LengthDist.parse("128"), pairs=pairs)
    )
    table = set(pairs.pairs)
    for (spec,) in sessions:
        assert (spec.input_tokens, spec.output_tokens) in table  # a real pair, kept whole
        assert count(tokenizer, spec.text) == spec.input_tokens
    assert len({s[0].output_tokens for s in sessions}) > 10  # not the fixed 128


def test_prefix_groups_interleave_and_share_their_system_prompt(text: SyntheticText, tokenizer):
    chat = ChatTemplate(tokenizer)
    out = LengthDist.parse("8")
    specs = [
        s[0]
        for s in synthetic(
            text,
            12,
            LengthDist.parse("20"),
            out,
            seed=3,
            chat=chat,
            shared_prefix=64,
            groups=4,
            group_prefix=200,
            session_ids="none",
        )
    ]
    systems = [s.history[0]["content"] for s in specs]
    rounds = [systems[:4], systems[4:8], systems[8:]]
    assert all(len(set(r)) == 4 and set(r) == set(rounds[0]) for r in rounds)  # each once
    assert len({tuple(r) for r in rounds}) > 1  # in a new order each round
    preamble = text.make(64, random.Random(3))
    assert all(s.startswith(preamble) for s in systems)  # one preamble, every group
    assert all(count(tokenizer, s) == 264 for s in systems[:4])
    assert len({s.text for s in specs}) == 12 and all(count(tokenizer, s.text) == 20 for s in specs)
    assert all(s.session is None for s in specs)
    assert all(s.input_tokens == chat.prompt_tokens(s.messages()) for s in specs)
    grouped = synthetic(
        text, 8, LengthDist.parse("20"), out, seed=3, groups=4, group_prefix=50, session_ids="group"
    )
    sessions = [s[0].session for s in grouped]
    assert sorted(sessions[:4]) == sorted(sessions[4:]) == ["g0", "g1", "g2", "g3"]


def test_multi_turn_sessions_can_go_without_ids(text: SyntheticText) -> None:
    length = LengthDist.parse("40")
    with_ids = list(synthetic(text, 2, length, length, turns=2))
    without = list(synthetic(text, 2, length, length, turns=2, session_ids="none"))
    assert {s.session for sess in with_ids for s in sess} == {"s0", "s1"}
    assert {s.session for sess in without for s in sess} == {None}
    assert [s.text for sess in without for s in sess] == [s.text for sess in with_ids for s in sess]


def test_turn_len_grows_the_history(text: SyntheticText, tokenizer) -> None:
    chat = ChatTemplate(tokenizer)
    out = LengthDist.parse("8")
    (session,) = synthetic(
        text, 1, LengthDist.parse("200"), out, chat=chat, turns=3, turn_len=LengthDist.parse("30")
    )
    assert session[0].input_tokens == 200
    assert [count(tokenizer, s.text) for s in session[1:]] == [30, 30]
    assert [len(s.history) for s in session] == [0, 2, 4]
    assert session[1].history[0]["content"] == session[0].text  # each turn extends the last
    growth = [b.input_tokens - a.input_tokens for a, b in itertools.pairwise(session)]
    assert all(30 + 8 <= g <= 30 + 8 + 12 for g in growth), growth  # message, answer, template
    assert all(s.input_tokens == chat.prompt_tokens(s.messages()) for s in session)
