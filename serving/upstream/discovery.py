"""Engine replicas found in DNS: each A/AAAA record of an engine's `discover.dns` is one
engine pod. In Kubernetes that name is a headless Service per tier.

Why DNS rather than the Kubernetes API (EndpointSlices):
- every poll is a full list, so there is no watch to break and no delete event to
  lose; a router cannot keep a dead pod for hours because one event went missing;
- the cluster DNS already lists only Ready pods (unless the Service publishes
  not-ready addresses) and drops a pod once it is terminating (deletionTimestamp);
- it needs no RBAC, no client library and no token, and works outside Kubernetes
  too (Consul, Docker's embedded DNS, a test server on loopback).
The cost is staleness of up to `interval_s` plus the record's TTL; the health loop
covers that gap (a gone pod fails /health and stops being ready). An EndpointSlice
source would plug in the same way: anything that yields the current set of addresses
can drive `Discovery.apply`, which fences replicas by address.

A failed lookup (timeout, SERVFAIL, no nameserver) keeps the last set: a DNS blip must
not empty a tier. An authoritative empty answer (NXDOMAIN, no records) empties it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.resolver

from serving.config import BreakerSettings, EngineSettings, PrefixSettings
from serving.metrics import GatewayMetrics
from serving.router.breaker import CircuitBreaker
from serving.router.prefix import ReplicaIndex
from serving.router.registry import Endpoint, EngineRegistry, Tier

log = logging.getLogger("tiergate.discovery")


@dataclass(frozen=True)
class Change:
    added: list[str]
    removed: list[str]


def diff(current: Iterable[str], found: Iterable[str]) -> Change:
    """Addresses to add and to remove, each sorted. Pure."""
    now, then = set(found), set(current)
    return Change(added=sorted(now - then), removed=sorted(then - now))


def endpoint_name(engine: str, address: str) -> str:
    return f"{engine}@{address}"


def engine_url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}"


def kv_events_url(address: str, port: int | None) -> str | None:
    """A pod's KV-event socket (the chart binds the publisher on PORT, replays on PORT+1)."""
    if not port or port == 1:
        return None
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def parse_nameserver(value: str) -> tuple[str, int]:
    """'10.0.0.10', '127.0.0.1:5353' or '[::1]:53' -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest.lstrip(":") or 53)
    if value.count(":") == 1:
        host, port = value.split(":")
        return host, int(port)
    return value, 53


class DnsSource:
    """The current addresses behind a DNS name, or None when the lookup failed."""

    def __init__(self, name: str, nameserver: str | None = None, timeout: float = 2.0) -> None:
        self.name = name
        if nameserver:
            self.resolver = dns.asyncresolver.Resolver(configure=False)
            host, port = parse_nameserver(nameserver)
            self.resolver.nameservers = [host]
            self.resolver.port = port
        else:
            self.resolver = dns.asyncresolver.Resolver()
        self.resolver.lifetime = timeout

    async def addresses(self) -> set[str] | None:
        found: set[str] = set()
        for rdtype in ("A", "AAAA"):
            try:
                answer = await self.resolver.resolve(self.name, rdtype, search=True)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                continue
            except dns.exception.DNSException as exc:
                log.warning(
                    "DNS lookup of %s (%s) failed, keeping the last set: %s", self.name, rdtype, exc
                )
                return None
            found.update(record.address for record in answer)
        return found


class Discovery:
    """Keeps one discovered engine's replicas in the registry and in its tiers."""

    def __init__(
        self,
        engine: EngineSettings,
        registry: EngineRegistry,
        breaker: BreakerSettings,
        metrics: GatewayMetrics,
        source: DnsSource | None = None,
        prefix: PrefixSettings | None = None,
    ) -> None:
        assert engine.discover is not None
        self.engine, self.registry, self.breaker, self.metrics = engine, registry, breaker, metrics
        self.settings = engine.discover
        self.source = source or DnsSource(engine.discover.dns, engine.discover.nameserver)
        self.tiers: list[Tier] = [t for t in registry.tiers if engine.name in t.sources]
        self.addresses: set[str] = set()
        self.prefix = prefix or PrefixSettings()

    def apply(self, found: set[str]) -> Change:
        """Make the replicas match `found`. New ones start not ready (the health loop
        probes them); removed ones leave the registry and the tiers at once, so they get
        no new requests, while streams already on them run to the end."""
        change = diff(self.addresses, found)
        if not (change.added or change.removed):
            return change
        for address in change.added:
            self.registry.add(
                Endpoint(
                    name=endpoint_name(self.engine.name, address),
                    model=self.engine.model_name,
                    url=engine_url(address, self.settings.port),
                    kv_events=kv_events_url(address, self.settings.kv_events_port),
                    kv_replay=kv_events_url(address, (self.settings.kv_events_port or 0) + 1),
                    state="external",
                    max_model_len=self.engine.args.get("max_model_len"),
                    breaker=CircuitBreaker(
                        self.breaker.failures, self.breaker.cooldown, self.breaker.half_open_share
                    ),
                    prefix=ReplicaIndex(
                        self.prefix.approx_blocks, self.prefix.pending_s, self.prefix.max_blocks
                    ),
                )
            )
        gone = {endpoint_name(self.engine.name, a) for a in change.removed}
        for name in gone:
            ep = self.registry.remove(name)
            ep.ready, ep.state = False, "removed"
            ep.prefix.forget()  # its subscription stops at the next Feeds.sync
            self.metrics.forget_engine(name)
        self.addresses = set(found)
        mine = {endpoint_name(self.engine.name, a) for a in self.addresses}
        for tier in self.tiers:
            kept = [ep for ep in tier.endpoints if ep.name not in gone]
            have = {ep.name for ep in kept}
            kept += [self.registry.get(n) for n in sorted(mine - have)]
            tier.set_endpoints(kept)
        log.info(
            "engine %s (%s): +%s -%s, now %d replicas",
            self.engine.name,
            self.settings.dns,
            change.added,
            change.removed,
            len(self.addresses),
        )
        return change

    async def run(self) -> None:
        while True:
            found = await self.source.addresses()
            if found is not None:
                self.apply(found)
            await asyncio.sleep(self.settings.interval_s)
