"""Subscribes to each engine's KV events (vLLM's ZMQ publisher) and feeds its prefix index.

vLLM publishes `[topic, seq (8 bytes, big-endian), msgpack batch]` on a PUB socket; a
batch is `[ts, [event, ...], dp_rank]` and each event a map tagged by `type`
(`BlockStored`, `BlockRemoved`, `AllBlocksCleared`). `decode_batch` turns that into
plain tuples for serving/router/prefix.py, which owns what they mean.

Lost batches: where the engine has a replay socket (its publisher's ROUTER, its
`replay_endpoint`; `Endpoint.kv_replay` here), the missing ones are asked for again;
otherwise, or when the replay cannot fill the gap, the index is emptied and fills again
from the next events.
A subscriber per engine runs while the engine is in the registry; `Feeds.sync` starts
and stops them as discovery adds and removes pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from serving.metrics import GatewayMetrics
from serving.router.registry import Endpoint, EngineRegistry
from serving.tasks import cancel_and_wait

log = logging.getLogger("tiergate.kv_events")

END_SEQ = -1
REPLAY_TIMEOUT_S = 1.0
_decoder = msgspec.msgpack.Decoder()


def _event(raw: Any) -> tuple | None:
    """One event as ("stored", hashes, parent, token_ids, block_size), ("removed",
    hashes) or ("cleared",); None for what the index cannot use."""
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
    elif isinstance(raw, list) and raw:  # array_like encodings: the tag first
        kind = raw[0]
        fields = {
            "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size"),
            "BlockRemoved": ("block_hashes",),
        }.get(kind, ())
        values = dict(zip(fields, raw[1:], strict=False))
        get = values.get
    else:
        return None
    if kind == "BlockStored":
        if (get("group_idx") or 0) != 0 or get("lora_name") or get("lora_id"):
            return None  # another KV group or an adapter: keys not computed from ids alone
        extra = get("extra_keys")
        if extra and any(extra):  # multimodal or cache_salt: not in our keys either
            return None
        hashes = [_hashable(h) for h in get("block_hashes") or ()]
        parent = get("parent_block_hash")
        return ("stored", hashes, _hashable(parent), get("token_ids") or [], get("block_size"))
    if kind == "BlockRemoved":
        if (get("group_idx") or 0) != 0:
            return None
        return ("removed", [_hashable(h) for h in get("block_hashes") or ()])
    if kind == "AllBlocksCleared":
        return ("cleared",)
    return None


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def decode_batch(payload: bytes) -> list[tuple]:
    """A published batch as plain events (serving/router/prefix.py `ReplicaIndex.apply`)."""
    batch = _decoder.decode(payload)
    if not isinstance(batch, list) or len(batch) < 2 or not isinstance(batch[1], list):
        raise ValueError("not a KV event batch")
    return [e for e in map(_event, batch[1]) if e is not None]


class Feed:
    """One engine's subscription: connect, read, apply; reconnects on its own (ZMQ)."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        ep: Endpoint,
        metrics: GatewayMetrics,
        replay: str | None = None,
    ) -> None:
        self.ctx, self.ep, self.metrics, self.replay = ctx, ep, metrics, replay
        self.url = ep.kv_events

    async def run(self) -> None:
        ep = self.ep
        ep.prefix.attach_events()
        sock = self.ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")  # every topic: one engine, one publisher
        sock.connect(self.url)
        log.info("engine %s: subscribed to KV events at %s", ep.name, self.url)
        try:
            while True:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    continue
                await self.handle(int.from_bytes(frames[1], "big", signed=True), frames[2])
        finally:
            sock.close(linger=0)

    async def handle(self, seq: int, payload: bytes) -> None:
        stats = self.ep.prefix.stats
        expected = stats.last_seq + 1
        if stats.last_seq >= 0 and seq > expected and self.replay:
            for missed_seq, missed in await self.fetch_replay(expected, seq):
                self._apply(missed_seq, missed, "replayed")
        self._apply(seq, payload, "received")

    def _apply(self, seq: int, payload: bytes, counted: str) -> None:
        ep = self.ep
        try:
            events = decode_batch(payload)
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("engine %s: undecodable KV event batch %d: %s", ep.name, seq, exc)
            events = []
        outcome = ep.prefix.apply(seq, events, time.time())
        self.metrics.kv_events.labels(ep.name, counted).inc()
        if outcome != "ok":
            self.metrics.kv_events.labels(ep.name, "dropped").inc()
            log.info(
                "engine %s: KV events %s at seq %d; its index starts again", ep.name, outcome, seq
            )
        if counted == "replayed":
            ep.prefix.stats.replayed += 1
        self.metrics.kv_last_event.labels(ep.name).set(ep.prefix.stats.last_event)

    async def fetch_replay(self, start: int, until: int) -> list[tuple[int, bytes]]:
        """Batches start..until-1 from the engine's replay socket; [] when it cannot
        give all of them in time (the caller then empties the index)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        got: list[tuple[int, bytes]] = []
        try:
            sock.connect(self.replay)
            await sock.send_multipart((b"", start.to_bytes(8, "big")))
            async with asyncio.timeout(REPLAY_TIMEOUT_S):
                while True:
                    frames = await sock.recv_multipart()
                    seq = int.from_bytes(frames[-2], "big", signed=True)
                    if seq == END_SEQ:
                        break
                    if start <= seq < until:
                        got.append((seq, frames[-1]))
        except (TimeoutError, zmq.ZMQError, IndexError):
            return []
        finally:
            sock.close(linger=0)
        return got if [s for s, _ in got] == list(range(start, until)) else []


class Feeds:
    """A Feed for each registered engine with a KV-event endpoint, kept in step with
    the registry (discovery adds and removes pods; a removed pod's index goes with it)."""

    def __init__(self, registry: EngineRegistry, metrics: GatewayMetrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.sources: dict[str, str] = {}  # engine -> the index source its gauge was set for
        self.tasks: dict[str, tuple[str, asyncio.Task]] = {}

    def sync(self) -> None:
        wanted = {ep.name: ep for ep in self.registry.endpoints if ep.kv_events}
        for name, (url, task) in list(self.tasks.items()):
            ep = wanted.get(name)
            if ep is None or ep.kv_events != url or task.done():
                task.cancel()
                del self.tasks[name]
        for name, ep in wanted.items():
            if name not in self.tasks:
                feed = Feed(self.ctx, ep, self.metrics, ep.kv_replay)
                task = asyncio.create_task(feed.run(), name=f"kv-events-{name}")
                self.tasks[name] = (ep.kv_events or "", task)

    def gauge(self, ep: Endpoint) -> None:
        blocks = self.metrics.prefix_blocks
        old = self.sources.get(ep.name)
        if old is not None and old != ep.prefix.source:
            with contextlib.suppress(KeyError):
                blocks.remove(ep.name, old)
        self.sources[ep.name] = ep.prefix.source
        blocks.labels(ep.name, ep.prefix.source).set(len(ep.prefix))

    async def run(self, interval: float = 1.0) -> None:
        try:
            while True:
                self.sync()
                for ep in self.registry.endpoints:
                    self.gauge(ep)
                await asyncio.sleep(interval)
        finally:
            await cancel_and_wait([task for _, task in self.tasks.values()])
            self.tasks.clear()
            with contextlib.suppress(Exception):
                self.ctx.term()
