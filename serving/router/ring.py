"""A consistent-hash ring, so a session keeps landing on the replica with its prefix cache.

Adding or removing a replica moves only the keys that belonged to it.
"""

from __future__ import annotations

import bisect
import hashlib


def _hash(value: str) -> int:
    return int.from_bytes(hashlib.blake2b(value.encode(), digest_size=8).digest(), "big")


class HashRing:
    def __init__(self, nodes: list[str], vnodes: int = 64) -> None:
        self._points = sorted((_hash(f"{node}#{i}"), node) for node in nodes for i in range(vnodes))
        self._keys = [p for p, _ in self._points]

    def order(self, key: str) -> list[str]:
        """Every node, in preference order for `key` (first = its home)."""
        if not self._points:
            return []
        start = bisect.bisect(self._keys, _hash(key)) % len(self._points)
        seen: dict[str, None] = {}
        for i in range(len(self._points)):
            node = self._points[(start + i) % len(self._points)][1]
            seen.setdefault(node)
        return list(seen)

    def lookup(self, key: str) -> str | None:
        order = self.order(key)
        return order[0] if order else None
