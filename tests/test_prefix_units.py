"""The prefix index, its event decoding and the replica score, with plain values."""

from __future__ import annotations

import random

import msgspec
import pytest

from serving.engines.process import with_kv_events
from serving.router.balancer import Limits, ReplicaView, Weights, rank
from serving.router.load import EngineLoad
from serving.router.planner import Placement, plan
from serving.router.prefix import ReplicaIndex, block_keys
from serving.router.registry import Endpoint, Tier
from serving.upstream.kv_events import decode_batch

LIMITS = Limits(8, 0.95, 100)


def test_block_keys_chain_the_prefix_and_skip_a_partial_block() -> None:
    a = list(range(300))
    b = list(range(256)) + [9] * 44
    ka, kb = block_keys(a, 128), block_keys(b, 128)
    assert len(ka) == 2 and ka == kb  # the third block is partial in both
    c = [7, *range(1, 300)]
    assert block_keys(c, 128)[1] != ka[1]  # a change in block 0 changes every later key
    assert block_keys(a, 128, limit=1) == ka[:1]
    assert block_keys(a[:100], 128) == []


def test_events_build_the_same_keys_the_router_computes() -> None:
    ids = list(range(1000, 1512))  # four blocks of 128
    index = ReplicaIndex()
    index.attach_events()
    assert index.apply(0, [("stored", [b"h0", b"h1"], None, ids[:256], 128)], 1.0) == "ok"
    # the next batch hangs two more blocks on the engine's hash of block 1
    index.apply(1, [("stored", [b"h2", b"h3"], b"h1", ids[256:], 128)], 2.0)
    keys = block_keys(ids, 128)
    assert index.match(keys, now=0) == 4 and len(index) == 4
    index.apply(2, [("removed", [b"h2"])], 3.0)
    assert index.match(keys, now=0) == 2  # the chain breaks at the evicted block
    index.apply(3, [("stored", [b"x"], b"unknown", ids[:128], 128)], 4.0)
    assert index.stats.orphans == 1
    index.apply(4, [("cleared",)], 5.0)
    assert len(index) == 0 and index.stats.events == 5


def test_a_restart_or_a_gap_empties_the_index() -> None:
    ids = list(range(128))
    index = ReplicaIndex()
    index.attach_events()
    stored = ("stored", [b"h0"], None, ids, 128)
    index.apply(5, [stored], 1.0)
    assert index.apply(0, [], 2.0) == "restarted" and len(index) == 0  # seq began again
    index.apply(1, [stored], 3.0)
    assert index.apply(3, [], 4.0) == "gap" and len(index) == 0  # seq 2 never came
    assert index.stats.dropped == 2
    index.apply(4, [stored], 5.0)
    index.forget()  # the supervisor saw the process end
    assert len(index) == 0 and index.stats.last_seq == -1


def test_the_approximate_index_is_lru_bounded() -> None:
    index = ReplicaIndex(capacity=4)
    first, second = block_keys(list(range(512)), 128), block_keys(list(range(9, 521)), 128)
    index.sent(first, now=0)
    assert index.match(first, now=100) == 4  # no expiry: it models the engine's cache
    index.sent(second, now=1)
    assert len(index) == 4 and index.match(first, now=1) == 0  # evicted, oldest first


def test_pending_blocks_count_until_they_expire() -> None:
    index = ReplicaIndex(pending_s=5)
    index.attach_events()
    keys = block_keys(list(range(256)), 128)
    index.sent(keys, now=10)
    assert index.match(keys, now=12) == 2
    assert index.match(keys, now=16) == 0
    assert len(index) == 0  # events alone fill the index itself


def test_decode_batch_reads_vllms_own_encoding() -> None:
    kv = pytest.importorskip("vllm.distributed.kv_events")
    batch = kv.KVEventBatch(
        ts=1.0,
        events=[
            kv.BlockStored(
                block_hashes=[b"\x01" * 32, 17],
                parent_block_hash=None,
                token_ids=list(range(256)),
                block_size=128,
                lora_id=None,
                medium="GPU",
                lora_name=None,
            ),
            kv.BlockStored(
                block_hashes=[5],
                parent_block_hash=None,
                token_ids=list(range(128)),
                block_size=128,
                lora_id=None,
                medium="GPU",
                lora_name="adapter",  # an adapter's blocks are keyed apart: skipped
            ),
            kv.BlockRemoved(block_hashes=[17], medium="GPU"),
            kv.AllBlocksCleared(),
        ],
    )
    events = decode_batch(msgspec.msgpack.encode(batch))
    assert events == [
        ("stored", [b"\x01" * 32, 17], None, list(range(256)), 128),
        ("removed", [17]),
        ("cleared",),
    ]
    with pytest.raises(ValueError):
        decode_batch(msgspec.msgpack.encode({"not": "a batch"}))


def test_supervised_engines_publish_on_private_ipc_sockets() -> None:
    args, events, replay = with_kv_events({"max_model_len": 2048}, "/tmp/tg-kv")
    assert (events, replay) == ("ipc:///tmp/tg-kv/events", "ipc:///tmp/tg-kv/replay")
    assert args["enable_prefix_caching"] is True
    assert args["kv_events_config"]["endpoint"] == events  # vLLM binds an ipc:// endpoint
    # a config's own publisher is kept; a bound tcp://*:P is reached on loopback
    own = {"enable_kv_cache_events": True, "endpoint": "tcp://*:5557"}
    assert with_kv_events({"kv_events_config": own}, "/x")[1:] == ("tcp://127.0.0.1:5557", None)
    # one told to connect out cannot be subscribed to; no prefix cache, no events
    out = {"enable_kv_cache_events": True, "endpoint": "tcp://10.0.0.9:5557"}
    assert with_kv_events({"kv_events_config": out}, "/x")[1] is None
    assert with_kv_events({"enable_prefix_caching": False}, "/x") == (
        {"enable_prefix_caching": False},
        None,
        None,
    )


def _view(name: str, matched: int = 0, in_flight: int = 0, **kw) -> ReplicaView:
    return ReplicaView(name, EngineLoad(**kw), in_flight, True, matched=matched)


def test_score_prefers_reuse_until_load_outweighs_it() -> None:
    w = Weights(load_tokens=256, max_credit=2048, session_tokens=1024)
    assert rank([_view("a"), _view("b", matched=512)], LIMITS, 0, w) == (["b", "a"], "prefix")
    # 512 tokens of reuse outweighs one request of load; at two it is a tie, and the
    # less loaded wins it
    assert rank([_view("a"), _view("b", 512, in_flight=1)], LIMITS, 0, w)[0][0] == "b"
    assert rank([_view("a"), _view("b", 512, in_flight=2)], LIMITS, 0, w)[0] == ["a", "b"]
    # equal reuse (a preamble every replica holds) decides nothing: load does
    assert rank([_view("a", 256, 1), _view("b", 256)], LIMITS, 0, w) == (["b", "a"], "load")
    # ties rotate by turn
    assert {rank([_view("a"), _view("b")], LIMITS, t, w)[0][0] for t in (0, 1)} == {"a", "b"}


def test_prefill_queued_ahead_counts_against_a_replica() -> None:
    w = Weights(load_tokens=256, max_credit=2048)
    cached = ReplicaView("a", EngineLoad(), 0, True, matched=384, queued=1000)
    # a holds 384 tokens of the prompt but has 1,000 tokens of others' prompts to compute
    # first: the request waits less on b, where nothing is queued
    assert rank([cached, _view("b")], LIMITS, 0, w) == (["b", "a"], "load")
    lighter = ReplicaView("a", EngineLoad(), 0, True, matched=384, queued=300)
    assert rank([lighter, _view("b")], LIMITS, 0, w)[0][0] == "a"


def test_a_hot_prefix_cannot_pile_everything_on_one_replica() -> None:
    w = Weights(load_tokens=256, max_credit=2048)
    # 8,000 tokens cached on a, none on b: the credit is capped at 2,048 = 8 requests
    assert rank([_view("a", 8000, 7), _view("b")], LIMITS, 0, w)[0][0] == "a"
    assert rank([_view("a", 8000, 8), _view("b")], LIMITS, 0, w)[0][0] == "b"  # a tie


def test_the_defaults_keep_a_group_behind_a_shared_preamble_and_cap_a_hot_prefix() -> None:
    w = Weights()  # load_tokens 64, max_credit 512
    # both hold the preamble (1 block); a holds the group's 3 blocks too (384 tokens):
    # worth 5 more requests of load there; at 6 it is a tie, and the less loaded wins
    assert rank([_view("a", 512, in_flight=5), _view("b", 128)], LIMITS, 0, w)[0][0] == "a"
    assert rank([_view("a", 512, in_flight=6), _view("b", 128)], LIMITS, 0, w)[0][0] == "b"
    # a long prompt all traffic shares, cached on a only: a takes 8 more requests than
    # b at most, then they tie and the less loaded wins
    assert rank([_view("a", 8000, 7), _view("b")], LIMITS, 0, w)[0][0] == "a"
    assert rank([_view("a", 8000, 8), _view("b")], LIMITS, 0, w)[0][0] == "b"


def test_saturated_replicas_are_left_out_whatever_they_hold() -> None:
    full = _view("a", 4000, waiting=9)
    assert rank([full, _view("b")], LIMITS)[0] == ["b"]


def _simulate(groups: int, per_group: int, preamble: int, seed: int = 0) -> tuple[dict, float]:
    """Two replicas whose caches fill as requests land (events arrive at once), requests
    of `groups` system prompts interleaved, `busy` requests in flight per replica decaying."""
    a, b = (Endpoint(n, "m", url=f"http://{n}", ready=True) for n in "ab")
    for ep in (a, b):
        ep.prefix.attach_events()
    tier = Tier("t", "m", [a, b])
    rng = random.Random(seed)
    common = [rng.randrange(50_000) for _ in range(preamble)]
    prompts = [
        common + [rng.randrange(50_000) for _ in range(900 - preamble)] for _ in range(groups)
    ]
    order = [g for _ in range(per_group) for g in rng.sample(range(groups), groups)]
    counts = {"a": 0, "b": 0}
    hits = total = 0
    in_flight: list[Endpoint] = []
    for i, g in enumerate(order):
        ids = prompts[g] + [rng.randrange(50_000) for _ in range(30)]
        keys = block_keys(ids, 128)
        attempt = plan(tier, [], [], LIMITS, 0.0, Placement({"t": keys}), 3, 1, turn=i)[0]
        ep = attempt.endpoint
        counts[ep.name] += 1
        hits += ep.prefix.match(keys, 0.0)
        total += len(keys)
        ep.prefix.apply(ep.prefix.stats.last_seq + 1, [("stored", keys, None, ids, 128)], 0.0)
        ep.in_flight += 1
        in_flight.append(ep)
        if len(in_flight) > 6:  # 6 in flight at a time, oldest finishes first
            in_flight.pop(0).in_flight -= 1
    return counts, hits / total


@pytest.mark.parametrize("preamble", [0, 256])
def test_shared_prefix_groups_spread_and_hit(preamble: int) -> None:
    counts, hit_rate = _simulate(groups=24, per_group=6, preamble=preamble)
    assert max(counts.values()) <= 0.6 * sum(counts.values())
    assert hit_rate >= 0.75  # 5 of 6 requests of a group find its prompt cached
