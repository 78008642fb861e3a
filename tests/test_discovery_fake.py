"""Per-pod discovery through DNS: a real DNS server on loopback (dnslib answers real DNS
packets) and FAKE engines, one per loopback address, as pods behind a headless Service."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
from collections.abc import Iterator

import pytest
from dnslib import QTYPE, RR, A, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from serving.app import build_registry
from serving.config import Settings
from serving.metrics import GatewayMetrics
from serving.router.balancer import Limits
from serving.router.planner import Placement, plan
from serving.router.prefix import block_keys
from serving.upstream.discovery import (
    Discovery,
    DnsSource,
    diff,
    endpoint_name,
    engine_url,
    parse_nameserver,
)
from tests.fake_engine import FakeEngine, in_process_gateway
from tests.utils import free_port

pytestmark = pytest.mark.anyio
NAME = "engines.small.test."


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Records(BaseResolver):
    """A zone whose A records the test changes while the server runs."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.queries = 0
        self.lock = threading.Lock()

    def resolve(self, request: DNSRecord, handler) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        with self.lock:
            self.queries += 1
            addresses = list(self.addresses)
        if str(qname) != NAME:
            reply.header.rcode = 3  # NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for address in addresses:
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply

    def set(self, *addresses: str) -> None:
        with self.lock:
            self.addresses = list(addresses)


@contextlib.contextmanager
def dns_server() -> Iterator[tuple[Records, str]]:
    records = Records()
    port = free_port()
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
    server = DNSServer(records, port=port, address="127.0.0.1", logger=quiet)
    server.start_thread()
    try:
        yield records, f"127.0.0.1:{port}"
    finally:
        server.stop()


async def wait_replicas_ready(client, n: int) -> list[str]:
    """Until exactly n discovered replicas are listed and ready (plus "fixed" if set)."""
    for _ in range(100):
        listed = (await client.get("/tiergate/engines")).json()["engines"]
        found = [e for e in listed if "@" in e["name"]]
        ready = [e["name"] for e in found if e["ready"]]
        if len(ready) == n and len(found) == n:
            return ready
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {n} ready: {listed}")


def test_pure_helpers() -> None:
    change = diff(["10.0.0.1", "10.0.0.2"], ["10.0.0.2", "10.0.0.3"])
    assert (change.added, change.removed) == (["10.0.0.3"], ["10.0.0.1"])
    assert diff([], []).added == []
    assert parse_nameserver("10.0.0.10") == ("10.0.0.10", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert engine_url("10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert engine_url("fd00::1", 8000) == "http://[fd00::1]:8000"


def _settings(nameserver: str, port: int = 8000, interval: float = 5.0) -> Settings:
    return Settings(
        engines=[
            {"name": "fixed", "model": "m", "url": "http://127.0.0.1:1"},
            {
                "name": "small",
                "model": "m",
                "discover": {
                    "dns": NAME,
                    "port": port,
                    "interval_s": interval,
                    "nameserver": nameserver,
                    "kv_events_port": 5557,
                },
            },
        ],
        tiers=[{"name": "small", "model": "m", "engines": ["small"]}],
        # the FAKE pods answer in milliseconds: a stalled one is retried on another pod
        # after 10 s, rather than holding a request for the default 300 s
        timeouts={"health_interval": 0.1, "read": 10},
        router={"scrape_interval": 0.1},
    )


def _text(metrics: GatewayMetrics) -> str:
    return metrics.exposition().decode()


def test_apply_scales_one_three_two_and_moves_only_the_removed_sessions() -> None:
    settings = _settings("127.0.0.1:1")
    registry = build_registry(settings)
    tier = registry.tier("small")
    assert tier.endpoints == []  # nothing until DNS answers
    metrics = GatewayMetrics()
    found = Discovery(settings.engines[1], registry, settings.router.breaker, metrics)

    found.apply({"10.0.0.1"})
    assert [ep.url for ep in tier.endpoints] == ["http://10.0.0.1:8000"]
    assert not tier.endpoints[0].ready  # probed by the health loop before any use

    found.apply({"10.0.0.1", "10.0.0.2", "10.0.0.3"})
    names = [ep.name for ep in tier.endpoints]
    assert names == [endpoint_name("small", f"10.0.0.{i}") for i in (1, 2, 3)]
    assert [ep.kv_events for ep in tier.endpoints] == [f"tcp://10.0.0.{i}:5557" for i in (1, 2, 3)]
    assert tier.endpoints[0].kv_replay == "tcp://10.0.0.1:5558"
    homes = {f"session-{i}": names[i % 3] for i in range(300)}
    for key, home in homes.items():  # where each session's last request went
        tier.remember(key, home)
    leaving = next(ep for ep in tier.endpoints if ep.name.endswith("10.0.0.2"))
    leaving.prefix.sent(block_keys(list(range(256)), 128), now=0)
    assert len(leaving.prefix) == 2
    leaving.in_flight = 1  # a stream still on it
    metrics.engine_ready.labels(leaving.name).set(1)
    metrics.engine_load(leaving.name, 2.0, 3.0, 0.5)  # as a scrape sets it
    assert f'tiergate_engine_requests_running{{engine="{leaving.name}"}} 3.0' in _text(metrics)

    change = found.apply({"10.0.0.1", "10.0.0.3"})
    assert change.removed == ["10.0.0.2"] and change.added == []
    assert [ep.name for ep in tier.endpoints] == [names[0], names[2]]
    assert leaving.name not in [ep.name for ep in registry.endpoints]
    assert (leaving.state, leaving.ready, leaving.in_flight) == ("removed", False, 1)
    assert f'engine="{leaving.name}"' not in _text(metrics)  # its series went with it
    assert len(leaving.prefix) == 0  # and its prefix index
    # Sessions whose replica stayed keep it; only the removed pod's sessions move.
    for ep in tier.endpoints:
        ep.ready = True
    limits = Limits(8, 0.95, 100)
    for key, home in list(homes.items())[:30]:
        first = plan(tier, [], [], limits, 0, Placement(session=key), 3, 1)[0].endpoint.name
        assert first == home if home != leaving.name else first in (names[0], names[2])
    # The fixed engine is untouched.
    assert registry.get("fixed").url == "http://127.0.0.1:1"


async def test_dns_source_reads_real_records_and_keeps_the_set_on_failure() -> None:
    with dns_server() as (records, nameserver):
        source = DnsSource(NAME, nameserver, timeout=1.0)
        records.set("127.0.0.2", "127.0.0.3")
        assert await source.addresses() == {"127.0.0.2", "127.0.0.3"}
        records.set()
        assert await source.addresses() == set()  # an authoritative empty answer
        assert await DnsSource("other.test.", nameserver).addresses() == set()  # NXDOMAIN
    # Nobody answers: a failure, not an empty set, so the caller keeps what it has.
    silent = DnsSource(NAME, f"127.0.0.1:{free_port()}", timeout=0.5)
    assert await silent.addresses() is None


async def test_scale_one_three_two_under_load_nothing_fails() -> None:
    port = free_port()
    hosts = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
    with (
        dns_server() as (records, nameserver),
        # drip: streams last ~0.2 s, so some are on the pod when it goes
        FakeEngine("drip", host=hosts[0], port=port) as a,
        FakeEngine("drip", host=hosts[1], port=port) as b,
        FakeEngine("drip", host=hosts[2], port=port) as c,
    ):
        fakes = {hosts[0]: a, hosts[1]: b, hosts[2]: c}
        records.set(hosts[0])
        settings = _settings(nameserver, port=port, interval=0.1)
        statuses: collections.Counter[int] = collections.Counter()
        async with in_process_gateway(settings) as client:
            stop = asyncio.Event()

            async def load(i: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    stream = i % 2 == 0
                    body = {  # distinct prompts: no prefix affinity pins them to one pod
                        "model": "m",
                        "messages": [{"role": "user", "content": f"question {i}-{n}"}],
                        "stream": stream,
                    }
                    r = await client.post("/v1/chat/completions", json=body)
                    cut = stream and not r.text.rstrip().endswith("data: [DONE]")
                    statuses[-1 if cut else r.status_code] += 1  # -1: a stream cut short

            removed: list[int] = []

            async def scale() -> None:
                await asyncio.sleep(0.3)
                records.set(*hosts)  # scale 1 -> 3
                await wait_replicas_ready(client, 3)
                seen = {h: len(f.app.state.seen) for h, f in fakes.items()}
                await asyncio.sleep(0.6)
                grew = {h: len(f.app.state.seen) - seen[h] for h, f in fakes.items()}
                assert all(n > 0 for n in grew.values()), grew  # the load spreads over all
                for _ in range(100):  # wait for a moment with a stream on the middle pod
                    listed = (await client.get("/tiergate/engines")).json()["engines"]
                    if any(
                        e["url"].startswith(f"http://{hosts[1]}") and e["in_flight"] for e in listed
                    ):
                        break
                    await asyncio.sleep(0.01)
                else:
                    raise AssertionError("no request ever in flight on the middle pod")
                records.set(hosts[0], hosts[2])  # scale 3 -> 2: the middle pod goes
                await wait_replicas_ready(client, 2)
                await asyncio.sleep(0.1)  # requests routed just before the change finish
                removed.append(len(b.app.state.seen))
                await asyncio.sleep(0.6)

            await wait_replicas_ready(client, 1)
            workers = [asyncio.create_task(load(i)) for i in range(6)]
            try:
                await scale()
            finally:
                stop.set()
                await asyncio.gather(*workers, return_exceptions=True)
        print("per-pod requests:", {h: len(f.app.state.seen) for h, f in fakes.items()})
        assert len(b.app.state.seen) == removed[0]  # no new request on the removed pod
        assert set(statuses) == {200}, statuses  # nothing failed through the changes
        assert statuses[200] > 50


async def test_the_breaker_acts_on_one_discovered_pod() -> None:
    port = free_port()
    hosts = ["127.0.0.5", "127.0.0.6", "127.0.0.7"]
    with (
        dns_server() as (records, nameserver),
        FakeEngine("ok", host=hosts[0], port=port) as good1,
        FakeEngine("error-500", host=hosts[1], port=port) as bad,
        FakeEngine("ok", host=hosts[2], port=port) as good2,
    ):
        records.set(*hosts)
        settings = _settings(nameserver, port=port, interval=0.1)
        settings.router.breaker.failures = 2
        settings.router.breaker.cooldown = 600
        async with in_process_gateway(settings) as client:
            await wait_replicas_ready(client, 3)
            results = []
            for i in range(30):
                body = {"model": "m", "messages": [{"role": "user", "content": f"q{i}"}]}
                results.append(await client.post("/v1/chat/completions", json=body))
            metrics = (await client.get("/metrics")).text
        counts = {"good1": len(good1.app.state.seen), "bad": len(bad.app.state.seen)}
        counts["good2"] = len(good2.app.state.seen)
        print("per-pod requests:", counts)
        assert [r.status_code for r in results] == [200] * 30  # retried on the good pods
        assert counts["bad"] == 2  # `failures` requests, then its breaker opened
        assert counts["good1"] > 5 and counts["good2"] > 5
        assert f'tiergate_circuit_state{{replica="small@{hosts[1]}"}} 2.0' in metrics
        assert f'tiergate_circuit_state{{replica="small@{hosts[0]}"}} 0.0' in metrics
