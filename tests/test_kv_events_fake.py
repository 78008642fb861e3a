"""The KV-event subscriber against a FAKE publisher: what a real engine cannot be made to
do on demand (lose a batch, restart its numbering, send garbage). It speaks vLLM's wire
format: [topic, seq, msgpack batch] on PUB, and replays on a ROUTER socket."""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import pytest
import zmq
import zmq.asyncio

from serving.metrics import GatewayMetrics
from serving.router.prefix import block_keys
from serving.router.registry import Endpoint, EngineRegistry
from serving.upstream.kv_events import Feeds
from tests.utils import free_port

pytestmark = pytest.mark.anyio
IDS = list(range(100, 100 + 4 * 128))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _stored(hashes: list[int], parent: int | None, ids: list[int]) -> dict:
    return {
        "type": "BlockStored",
        "block_hashes": hashes,
        "parent_block_hash": parent,
        "token_ids": ids,
        "block_size": 128,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
    }


BATCHES = [  # one block per batch, chained by the engine's own hashes 10, 11, 12, 13
    [_stored([10 + i], 10 + i - 1 if i else None, IDS[i * 128 : (i + 1) * 128])] for i in range(4)
]


class FakePublisher:
    """FAKE engine side: publishes chosen batches under chosen numbers; answers replays
    from what it was told to keep (`replay` False: no replay socket at all)."""

    def __init__(self, ctx: zmq.asyncio.Context, replay: bool) -> None:
        self.router = None
        while True:  # the replay socket is on port + 1: both must be free
            self.port = free_port()
            self.pub = ctx.socket(zmq.XPUB)  # a PUB that hears subscriptions
            try:
                self.pub.bind(f"tcp://127.0.0.1:{self.port}")
                if replay:
                    self.router = ctx.socket(zmq.ROUTER)
                    self.router.bind(f"tcp://127.0.0.1:{self.port + 1}")
                break
            except zmq.ZMQError:
                self.pub.close(0)
                if self.router is not None:
                    self.router.close(0)
                    self.router = None
        self.kept: dict[int, bytes] = {}
        self.task = asyncio.create_task(self._serve()) if replay else None

    async def send(self, seq: int, events: list, publish: bool = True) -> None:
        payload = msgspec.msgpack.encode([1.0, events, None])
        self.kept[seq] = payload
        if publish:
            await self.pub.send_multipart([b"kv", seq.to_bytes(8, "big"), payload])

    async def _serve(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            for seq in sorted(s for s in self.kept if s >= int.from_bytes(start, "big")):
                await self.router.send_multipart(
                    [client, b"", b"kv", seq.to_bytes(8, "big"), self.kept[seq]]
                )
            await self.router.send_multipart(
                [client, b"", b"", (-1).to_bytes(8, "big", signed=True), b""]
            )

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.pub.close(0)
        if self.router is not None:
            self.router.close(0)


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _subscribed(replay: bool):
    """A subscriber on a FAKE publisher that has taken its first batch; everything is
    closed on the way out, also when setting up failed (a ZMQ context left with open
    sockets blocks whoever terminates it: the next test, at garbage collection)."""
    ctx = zmq.asyncio.Context()
    publisher = task = None
    try:
        publisher = FakePublisher(ctx, replay)
        ep = Endpoint("e", "m", url="http://e", ready=True)
        ep.kv_events = f"tcp://127.0.0.1:{publisher.port}"
        ep.kv_replay = f"tcp://127.0.0.1:{publisher.port + 1}" if replay else None
        registry = EngineRegistry([ep])
        metrics = GatewayMetrics()
        feeds = Feeds(registry, metrics)
        task = asyncio.create_task(feeds.run(interval=0.05))
        # a PUB drops what it sends before the SUB has joined: wait for its subscription
        assert (await asyncio.wait_for(publisher.pub.recv(), 10))[:1] == b"\x01"
        await publisher.send(0, BATCHES[0])
        await _until(lambda: ep.prefix.stats.events == 1)
        yield publisher, ep, metrics, feeds
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if publisher is not None:
            publisher.close()
        ctx.destroy(linger=0)


async def test_a_lost_batch_is_replayed_and_nothing_is_dropped() -> None:
    async with _subscribed(replay=True) as (publisher, ep, metrics, _):
        keys = block_keys(IDS, 128)
        assert ep.prefix.source == "events" and ep.prefix.match(keys, 0) == 1
        await publisher.send(1, BATCHES[1], publish=False)  # lost on the way
        await publisher.send(2, BATCHES[2])
        await _until(lambda: ep.prefix.stats.last_seq == 2)
        assert ep.prefix.match(keys, 0) == 3  # block 1 came back through the replay
        assert (ep.prefix.stats.replayed, ep.prefix.stats.dropped) == (1, 0)
        text = metrics.exposition().decode()
        assert 'tiergate_kv_events_total{engine="e",outcome="replayed"} 1.0' in text
        # garbage is logged and counted as a batch with no events; the chain goes on
        await publisher.pub.send_multipart([b"kv", (3).to_bytes(8, "big"), b"\xc1garbage"])
        await publisher.send(4, BATCHES[3])
        await _until(lambda: ep.prefix.stats.last_seq == 4)
        assert ep.prefix.match(keys, 0) == 4 and ep.prefix.stats.dropped == 0


async def test_a_gap_without_replay_and_a_restart_empty_the_index() -> None:
    async with _subscribed(replay=False) as (publisher, ep, metrics, feeds):
        keys = block_keys(IDS, 128)
        await publisher.send(1, BATCHES[1])
        await _until(lambda: ep.prefix.match(keys, 0) == 2)
        await publisher.send(3, BATCHES[2])  # 2 never comes, and cannot be asked for
        await _until(lambda: ep.prefix.stats.last_seq == 3, timeout=5)
        assert ep.prefix.stats.dropped == 1 and ep.prefix.match(keys, 0) == 0
        await publisher.send(4, BATCHES[0])
        await _until(lambda: ep.prefix.match(keys, 0) == 1)
        await publisher.send(0, [])  # a new engine process numbers from 0 again
        await _until(lambda: ep.prefix.stats.last_seq == 0)
        assert ep.prefix.stats.dropped == 2 and len(ep.prefix) == 0
        text = metrics.exposition().decode()
        assert 'tiergate_kv_events_total{engine="e",outcome="dropped"} 2.0' in text
        # discovery removes the pod: its subscription stops
        feeds.registry.endpoints = []
        await _until(lambda: not feeds.tasks)
