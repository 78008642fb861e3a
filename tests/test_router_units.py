"""The router's pure parts: tier rules, load, the replica score, breaker, budget, plans."""

from __future__ import annotations

import json

import pytest

from serving.config import RulesSettings
from serving.errors import InvalidRequest, NoEngineReady, Saturated
from serving.router.balancer import Limits, ReplicaView, rank
from serving.router.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker, RetryBudget
from serving.router.load import EngineLoad, load_score, others_of, parse_vllm_metrics
from serving.router.planner import Placement, plan
from serving.router.policy import Features, TierView, choose_tier
from serving.router.registry import Endpoint, Tier

TIERS = [
    TierView("small", 2048, 256),
    TierView("medium", 8192, 1024),
    TierView("large", 32768, 4096),
]
RULES = RulesSettings(
    default_tier="small",
    tools_tier="medium",
    long_prompt_tokens=1000,
    long_prompt_tier="large",
    long_output_tokens=500,
    long_output_tier="medium",
)


def _f(tokens: int, **kw) -> Features:
    return Features(prompt_tokens={t.name: tokens for t in TIERS}, **kw)


@pytest.mark.parametrize(
    ("features", "tier", "reason"),
    [
        (_f(50), "small", "default"),
        (_f(50, max_tokens=100), "small", "default"),
        (_f(50, has_tools=True), "medium", "tools"),
        (_f(50, has_response_format=True), "medium", "tools"),
        (_f(1500), "large", "long_prompt"),
        (_f(50, max_tokens=600), "medium", "long_output"),
        (_f(50, max_tokens=300), "medium", "fit"),  # over small's output limit
        (_f(3000, max_tokens=10), "large", "long_prompt"),
        (_f(50, hint="large"), "large", "hint"),
        (_f(40000), "large", "too_long"),
    ],
)
def test_tier_rules(features: Features, tier: str, reason: str) -> None:
    decision = choose_tier(features, TIERS, RULES)
    assert (decision.tier, decision.reason) == (tier, reason)


def test_unknown_hint_is_invalid() -> None:
    with pytest.raises(InvalidRequest, match="huge"):
        choose_tier(_f(10, hint="huge"), TIERS, RULES)


def test_parse_vllm_metrics() -> None:
    text = """# HELP vllm:num_requests_running Number of requests
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 64.0
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 128.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
"""
    load = parse_vllm_metrics(text)
    assert load == EngineLoad(
        waiting=2, running=4, kv_usage=0.25, prefix_hits=64, prefix_queries=128
    )
    assert parse_vllm_metrics("") == EngineLoad()


def test_load_score_and_rank() -> None:
    limits = Limits(max_waiting=4, max_kv_usage=0.9, max_in_flight=10)
    idle = ReplicaView("a", EngineLoad(), 0, True)
    busy = ReplicaView("b", EngineLoad(running=5, waiting=1), 2, True)
    full = ReplicaView("c", EngineLoad(waiting=5), 0, True)
    down = ReplicaView("d", EngineLoad(), 0, False)
    assert load_score(0, 0) < load_score(2, 0) == load_score(0, 2)
    # at a scrape: the engine's requests that are not this process's own
    assert others_of(EngineLoad(running=5, waiting=1), 2) == 4
    assert others_of(EngineLoad(running=1), 3) == 0  # ours not yet seen by the engine
    assert rank([busy, idle, full, down], limits) == (["a", "b"], "load")


def test_breaker_states() -> None:
    b = CircuitBreaker(failure_threshold=2, cooldown=5)
    assert b.allows(0)
    b.failure(0)
    assert b.state == CLOSED and b.allows(0)
    b.failure(1)
    assert b.state == OPEN and not b.allows(2) and not b.peek(2)
    assert b.peek(6) and b.allows(6) and b.state == HALF_OPEN
    assert not b.allows(6)  # one in flight: the next waits for its share
    b.failure(7)
    assert b.state == OPEN and not b.allows(8)
    assert b.allows(12)
    b.success()
    assert b.state == CLOSED and b.failures == 0 and b.allows(12)


def test_retry_budget() -> None:
    budget = RetryBudget(ratio=0.1, min_retries=2, window=10)
    for _ in range(100):
        budget.record_request(0)
    spent = sum(budget.try_spend(0) for _ in range(50))
    assert spent == 12  # 2 + 10% of 100
    assert not budget.try_spend(1)
    assert budget.try_spend(25)  # counts decay: capacity comes back


def _tier(name: str, *eps: Endpoint) -> Tier:
    return Tier(name, f"{name}-model", list(eps))


def _ep(name: str, **kw) -> Endpoint:
    return Endpoint(name, "m", url=f"http://{name}", ready=True, **kw)


def test_plan_orders_replicas_then_fallback_tiers() -> None:
    limits = Limits(8, 0.95, 100)
    a, b, c = _ep("a"), _ep("b"), _ep("c")
    small, large = _tier("small", a, b), _tier("large", c)
    a.in_flight = 3
    attempts = plan(small, [small, large], ["small", "large"], limits, 0, None, 5, 1)
    assert [(x.endpoint.name, x.why) for x in attempts] == [
        ("b", "load"),
        ("a", "load"),
        ("c", "fallback"),
    ]
    no_order = plan(small, [small, large], [], limits, 0, None, 5, 1)
    assert [x.endpoint.name for x in no_order] == ["b", "a"]  # no cross-tier fallback
    assert len(plan(small, [small, large], ["small", "large"], limits, 0, None, 2, 1)) == 2


def test_plan_spills_when_the_tier_is_full_and_429_when_all_are() -> None:
    limits = Limits(max_waiting=2, max_kv_usage=0.95, max_in_flight=100)
    a, c = _ep("a", load=EngineLoad(waiting=3)), _ep("c")
    small, large = _tier("small", a), _tier("large", c)
    attempts = plan(small, [small, large], ["small", "large"], limits, 0, None, 3, 1)
    assert [(x.endpoint.name, x.why) for x in attempts] == [("c", "spill")]
    c.load = EngineLoad(kv_usage=0.99)
    with pytest.raises(Saturated) as info:
        plan(small, [small, large], ["small", "large"], limits, 0, None, 3, 7)
    assert info.value.headers["retry-after"] == "7"
    assert 3500 <= int(info.value.headers["retry-after-ms"]) <= 10500  # spread, 0.5-1.5x


def test_plan_skips_open_breakers_and_down_replicas() -> None:
    limits = Limits(8, 0.95, 100)
    a, b = _ep("a"), _ep("b")
    for t in range(3):
        a.breaker.failure(t)
    b.ready = True
    assert [x.endpoint.name for x in plan(_tier("s", a, b), [], [], limits, 3, None, 3, 1)] == ["b"]
    b.ready = False
    a.ready = False
    with pytest.raises(NoEngineReady):  # nothing ready at all
        plan(_tier("small", a, b), [], [], limits, 3, None, 3, 1)


def test_panic_when_every_ready_replica_is_ejected() -> None:
    limits = Limits(8, 0.95, 100)
    a, b, down = _ep("a"), _ep("b"), _ep("down")
    down.ready = False
    for ep in (a, b):
        for t in range(3):
            ep.breaker.failure(t)
    attempts = plan(_tier("s", a, b, down), [], [], limits, 3, None, 3, 1)
    assert sorted(x.endpoint.name for x in attempts) == ["a", "b"]  # never the one down
    assert {x.why for x in attempts} == {"panic"}
    b.breaker.success()  # one replica trusted again: no panic, only it
    attempts = plan(_tier("s", a, b, down), [], [], limits, 3, None, 3, 1)
    assert [(x.endpoint.name, x.why) for x in attempts] == [("b", "load")]


def test_half_open_lets_a_share_through() -> None:
    b = CircuitBreaker(failure_threshold=1, cooldown=5, half_open_share=0.25)
    b.failure(0)
    admitted = [b.allows(6) for _ in range(40)]
    assert b.state == HALF_OPEN
    assert admitted[0] and 9 <= sum(admitted) <= 11  # the first, then one in four
    for _ in range(sum(admitted)):
        b.abandon()
    assert b.probing == 0 and b.allows(6)  # a freed slot is usable again
    b.success()
    assert b.state == CLOSED and all(b.allows(7) for _ in range(10))


def test_a_session_prefers_where_it_went_last_but_yields_to_load() -> None:
    limits = Limits(8, 0.95, 100)
    eps = [_ep(n) for n in "abc"]
    tier = _tier("t", *eps)
    tier.remember("s1", "c")
    first = plan(tier, [], [], limits, 0, Placement(session="s1"), 3, 1)
    assert (first[0].endpoint.name, first[0].why) == ("c", "session")
    eps[2].in_flight = 9  # 9 x 64 > 512: the session's credit is outweighed
    moved = plan(tier, [], [], limits, 0, Placement(session="s1"), 3, 1)
    assert moved[0].endpoint.name != "c" and moved[0].why == "load"
    # a session never seen goes by load, and is then remembered where it went
    assert plan(tier, [], [], limits, 0, Placement(session="new"), 3, 1)[0].why == "load"


def test_token_counter_uses_the_real_tokenizer() -> None:
    from models.manifest import load_manifest
    from models.prepare import prepare
    from serving.config import load_settings
    from serving.router.tokens import TokenCounter

    folder = prepare(load_manifest("smollm2-135m-instruct"), load_settings().model_cache)
    counter = TokenCounter({"small": folder, "large": folder})
    chat = {"messages": [{"role": "user", "content": "word " * 600}]}
    counts, estimated = counter.count_all(chat)
    assert counts["small"] == counts["large"] and not estimated
    assert 600 <= counts["small"] <= 660  # 600 words plus the chat template's tokens
    assert counter.count("small", {"prompt": "Hello world"}) == 2
    assert counter.count("small", {"prompt": [1, 2, 3]}) == 3
    assert counter.count("small", {"prompt": ["Hello world", "Hi"]}) == 2


def test_char_keys_share_a_prefix_block_by_block() -> None:
    from serving.api.serving import char_keys

    base = {"messages": [{"role": "system", "content": "x" * 600}]}
    longer = {"messages": [*base["messages"], {"role": "user", "content": "y" * 600}]}
    short, long = char_keys(base, 256, 100), char_keys(longer, 256, 100)
    assert len(short) == 2 and long[:2] == short and len(long) == 4
    assert char_keys(longer, 256, 3) == long[:3]  # bounded
    assert char_keys({"prompt": "abc"}, 256, 10) == []


def test_token_counts_match_transformers_without_importing_it() -> None:
    import subprocess
    import sys

    from models.manifest import load_manifest
    from models.prepare import prepare
    from serving.config import load_settings
    from serving.router.tokens import EXACT_CHARS, TokenCounter

    folder = prepare(load_manifest("smollm2-135m-instruct"), load_settings().model_cache)
    payloads = [
        {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": 'Héllo\n  wörld, {"json": [1, 2]} 😀'},
                {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "word " * 300},
            ]
        },
        {"prompt": "The capital of France is"},
    ]
    # transformers' own counts, in a child so this process never imports it
    code = (
        "import json, sys; from transformers import AutoTokenizer; "
        f"t = AutoTokenizer.from_pretrained({str(folder)!r}); out = []\n"
        "for p in json.loads(sys.stdin.read()):\n"
        "    out.append(len(t.apply_chat_template(p['messages'], tokenize=True, "
        "add_generation_prompt=True, return_dict=False)) if 'messages' in p else "
        "len(t.encode(p['prompt'])))\n"
        "print(json.dumps(out))"
    )
    expected = json.loads(
        subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(payloads),
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    counter = TokenCounter({"t": folder})
    assert [counter.count("t", p) for p in payloads] == expected
    # content parts count as their text
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}]}
    assert counter.count("t", parts) == counter.count(
        "t", {"messages": [{"role": "user", "content": "Hi there"}]}
    )
    # under every threshold that matters, a byte bound stands in for the count
    short = {"messages": [{"role": "user", "content": "Héllo wörld"}]}
    exact = counter.count("t", short)
    bound = counter.measure("t", short, below=1000)
    assert bound.bounded and exact <= bound.tokens < 1000
    assert not counter.measure("t", short, below=exact).bounded  # near it: counted exactly
    assert counter.measure("t", short, below=exact).tokens == exact
    # a huge prompt is counted on a prefix and flagged as an estimate
    huge = {"prompt": "word " * (EXACT_CHARS // 2)}
    counts, estimated = counter.count_all(huge)
    assert estimated and abs(counts["t"] - EXACT_CHARS // 2) < EXACT_CHARS * 0.02


def test_stored_response_ids_name_their_replica() -> None:
    from serving.router import stored

    public = stored.public_id("resp_0a1b2c", "tg-small/10.0.0.7:8000")
    assert public.startswith("resp_") and "~" in public
    assert stored.split_id(public) == ("tg-small/10.0.0.7:8000", "resp_0a1b2c")
    for other in ("resp_0a1b2c", "msg_1", "resp_~x", "resp_!!~x", "resp_abc~"):
        assert stored.split_id(other) == (None, other)


def test_stored_response_ids_are_retagged_in_bodies_and_events() -> None:
    from serving.router import stored

    tag = stored.tag_of("a")
    body = b'{"id": "resp_1", "previous_response_id": "resp_0", "output": []}'
    assert stored.retag(body, "a") == (
        b'{"id": "resp_%s~1", "previous_response_id": "resp_%s~0", "output": []}'
        % (tag.encode(), tag.encode())
    )
    event = b'event: response.created\ndata: {"response":{"id":"resp_9"}}\n\n'
    assert b'"id":"resp_%s~9"' % tag.encode() in stored.retag(event, "a")
    text = b'{"text":"a \\":\\"resp_x and \\"resp_y"}'  # the model wrote them: untouched
    assert stored.retag(text, "a") == text


@pytest.mark.parametrize(
    ("supervised", "state", "ready", "reading", "answer"),
    [
        (True, "ready", True, False, "home"),
        (True, "down", False, False, 404),  # killed: its memory, and the response, are gone
        (True, "starting", False, True, 404),  # a new process: it never stored this
        (True, "failed", False, False, 404),
        (True, "draining", False, True, "home"),  # still alive: a read is answered
        (True, "draining", False, False, 503),  # but it takes no new turn
        (False, "ready", False, True, 503),  # an external engine missing /health may be alive
    ],
)
def test_a_stored_response_whose_replica_is_gone_is_a_404(
    supervised: bool, state: str, ready: bool, reading: bool, answer: object
) -> None:
    from serving.api.stored import home_of
    from serving.errors import NotFound
    from serving.router.registry import EngineRegistry

    ep = Endpoint("a", "m", url="http://127.0.0.1:1", supervised=supervised)
    ep.state, ep.ready = state, ready
    registry = EngineRegistry([ep])
    if answer == "home":
        assert home_of(registry, "a", "response 'r'", "response_id", reading) is ep
        return
    error = NotFound if answer == 404 else NoEngineReady
    with pytest.raises(error) as refused:
        home_of(registry, "a", "response 'r'", "response_id", reading)
    assert refused.value.status == answer
    if answer == 404:
        assert "gone" in refused.value.message and "memory" in refused.value.message
        assert refused.value.param == "response_id"
    if state == "draining":  # says why, and that waiting will not bring it back
        assert "draining for a restart" in refused.value.message
        assert "gone" in refused.value.message and refused.value.param == "response_id"
    with pytest.raises(NotFound) as unknown:  # one this fleet lacks (discovery dropped it)
        home_of(registry, "b", "response 'r'", "response_id", reading)
    assert "gone" in unknown.value.message and unknown.value.param == "response_id"
