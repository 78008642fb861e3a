"""What each replica has in its prefix cache, as chains of block hashes. Pure state.

A prompt's token ids are cut into the engine's blocks (128 tokens on vLLM-CPU, 16 on
most GPUs); block i's key is a hash of block i-1's key and its own ids, so one key
stands for the whole prefix up to it. The keys are ours, computed from token ids
(as llm-d does): they never depend on vLLM's hash seed, and the router computes the
same keys for a request it has never sent.

A replica's index is fed one of two ways:
- **events** (vLLM's KV events, decoded in serving/upstream/kv_events.py):
  `stored` adds blocks (each names its parent by the engine's hash, which is mapped to
  ours), `removed` drops them, `cleared` empties it. It mirrors the engine's cache.
- **approximate**, where the engine publishes nothing: what the router itself sent
  there, least recently used first out, `capacity` blocks at most (eviction modelled).

Either way `sent` also remembers, for `pending_s` seconds, the blocks of requests just
routed there: events name a block only once the engine schedules it, and a burst of
one prefix would otherwise spread before the first event lands.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

ROOT = 0  # the key before the first block


def block_keys(ids: Sequence[int], block_size: int, limit: int = 1 << 30) -> list[int]:
    """The key of every full block of `ids` (at most `limit` blocks), in order."""
    keys: list[int] = []
    parent = ROOT
    for start in range(0, min(len(ids) // block_size, limit) * block_size, block_size):
        parent = hash((parent, *ids[start : start + block_size]))
        keys.append(parent)
    return keys


@dataclass
class IndexStats:
    events: int = 0  # event batches applied
    dropped: int = 0  # times the index was emptied for a gap or a restart
    replayed: int = 0  # batches recovered from the engine's replay socket
    orphans: int = 0  # stored blocks whose parent was unknown (skipped)
    last_seq: int = -1
    last_event: float = 0.0  # wall-clock time of the last batch, 0: none yet


class ReplicaIndex:
    """One replica's cached prefixes. `source`: "events" once an event feed is attached,
    else "approximate"."""

    def __init__(self, capacity: int = 4096, pending_s: float = 5.0, max_blocks: int = 262_144):
        self.capacity = capacity  # approximate mode: blocks the engine is taken to hold
        self.pending_s = pending_s
        self.max_blocks = max_blocks  # events mode: a bound on memory, whatever is sent
        self.source = "approximate"
        self.blocks: OrderedDict[int, Hashable | None] = OrderedDict()  # key -> engine hash
        self.by_engine: dict[Hashable, int] = {}
        self.pending: OrderedDict[int, float] = OrderedDict()  # key -> expiry (monotonic)
        self.stats = IndexStats()

    def __len__(self) -> int:
        return len(self.blocks)

    # --- reads -------------------------------------------------------------------------
    def match(self, keys: Sequence[int], now: float) -> int:
        """How many leading blocks of `keys` this replica holds (or was just sent)."""
        blocks, pending = self.blocks, self.pending
        n = 0
        for key in keys:
            if key in blocks:
                n += 1
                continue
            expiry = pending.get(key)
            if expiry is None or expiry < now:
                break
            n += 1
        return n

    # --- the router's own sends ----------------------------------------------------------
    def sent(self, keys: Sequence[int], now: float) -> None:
        """A request with these blocks was routed here."""
        if not keys:
            return
        if self.source == "approximate":
            blocks = self.blocks
            for key in keys:
                if key in blocks:
                    blocks.move_to_end(key)
                else:
                    blocks[key] = None
            while len(blocks) > self.capacity:
                blocks.popitem(last=False)
            return
        pending, expiry = self.pending, now + self.pending_s
        for key in keys:
            pending[key] = expiry
            pending.move_to_end(key)
        while pending and (len(pending) > self.capacity or next(iter(pending.values())) < now):
            pending.popitem(last=False)

    # --- events ---------------------------------------------------------------------------
    def attach_events(self) -> None:
        """From now on the engine's events are the truth: what was guessed goes."""
        if self.source != "events":
            self.source = "events"
            self.clear()

    def stored(
        self,
        engine_hashes: Sequence[Hashable],
        parent: Hashable | None,
        token_ids: Sequence[int],
        block_size: int,
    ) -> None:
        if parent is None:
            key = ROOT
        else:
            key = self.by_engine.get(parent)
            if key is None:  # its parent was evicted or never seen: no chain to hang on
                self.stats.orphans += 1
                return
        for i, engine_hash in enumerate(engine_hashes):
            block = token_ids[i * block_size : (i + 1) * block_size]
            if len(block) < block_size:
                break
            key = hash((key, *block))
            self.blocks[key] = engine_hash
            self.by_engine[engine_hash] = key
        if len(self.blocks) > self.max_blocks:  # an engine that never says `removed`
            self.clear()
            self.stats.dropped += 1

    def removed(self, engine_hashes: Iterable[Hashable]) -> None:
        for engine_hash in engine_hashes:
            key = self.by_engine.pop(engine_hash, None)
            if key is not None:
                self.blocks.pop(key, None)

    def clear(self) -> None:
        self.blocks.clear()
        self.by_engine.clear()
        self.pending.clear()

    def forget(self) -> None:
        """The engine restarted or went away: nothing it held is there any more."""
        self.clear()
        self.stats.last_seq = -1

    def apply(self, seq: int, events: Iterable[tuple], wall: float) -> str:
        """One batch of the engine's events, numbered `seq` by its publisher. Returns
        "ok", or "restarted" (the numbers started again: a new engine process, whose
        cache is empty) or "gap" (batches were lost: what is known may be wrong), after
        which the index was emptied and fills again from this batch on."""
        outcome = "ok"
        last = self.stats.last_seq
        if last >= 0 and seq <= last:
            outcome = "restarted"
        elif last >= 0 and seq != last + 1:
            outcome = "gap"
        if outcome != "ok":
            self.clear()
            self.stats.dropped += 1
        self.stats.last_seq, self.stats.last_event = seq, wall
        self.stats.events += 1
        for event in events:
            kind = event[0]
            if kind == "stored":
                self.stored(*event[1:])
            elif kind == "removed":
                self.removed(event[1])
            elif kind == "cleared":
                self.clear()
        return outcome

    def view(self, now_wall: float) -> dict:
        s = self.stats
        return {
            "source": self.source,
            "blocks": len(self.blocks),
            "pending_blocks": len(self.pending),
            "events": s.events,
            "dropped": s.dropped,
            "replayed": s.replayed,
            "orphans": s.orphans,
            "last_seq": s.last_seq,
            "staleness_s": round(now_wall - s.last_event, 3) if s.last_event else None,
        }
