"""Tenancy in a real PostgreSQL (Debian's server, started here by tests/postgres.py):
migrations, the `tiergate keys` CLI, revocation across gateways through LISTEN/NOTIFY,
the batched ledger, and an outage. Engines are FAKE here (tests/fake_engine.py) except
in the two-process test, which fronts the session's real engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import httpx
import pytest
import yaml

from serving.config import Settings
from serving.tenants.pg_store import PgAdmin, migrate
from serving.tenants.store import Tenant
from tests.fake_engine import FakeEngine, in_process_gateway
from tests.postgres import PgServer, binaries
from tests.utils import REPO, GatewayProcess

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server():
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (make test installs it where it runs as root)")
    pg = PgServer(bin_dir).start()
    try:
        yield pg
    finally:
        proc = pg.proc
        pg.close()
        assert proc is None or proc.poll() is not None  # stopped, not orphaned


@pytest.fixture
def db_url(server: PgServer) -> str:
    """A fresh database per test."""
    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.url.rsplit("/", 1)[0] + "/" + name


def _settings(url: str, engine: str, **tenancy) -> Settings:
    return Settings(
        engines=[{"name": "e", "model": "m", "url": engine}],
        tenancy={"enabled": True, "database_url": url, **tenancy},
        timeouts={"health_interval": 0.1},
    )


def _chat(client, key: str, **extra):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
    )


def test_migrations_run_once_when_replicas_start_together(db_url: str) -> None:
    import psycopg

    results: list[list[int]] = []

    def start() -> None:
        with psycopg.connect(db_url, autocommit=True) as conn:
            results.append(migrate(conn))

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [[]] * 5 + [[1]]  # one applied it, five found it done
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT version FROM tiergate_migrations").fetchall() == [(1,)]
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
    assert {"tiergate_usage_pkey", "tiergate_usage_day"} <= indexes


async def test_revoke_reaches_every_gateway_within_a_second(db_url: str) -> None:
    with PgAdmin(db_url) as admin:
        admin.set_tenant(Tenant("team-a", (), rpm=None))
        key = admin.create_key("team-a", "ci")
    with FakeEngine("ok") as engine:
        settings = _settings(db_url, engine.url)
        async with in_process_gateway(settings) as a, in_process_gateway(settings) as b:
            for client in (a, b):  # the snapshot loads at start
                for _ in range(50):
                    if (await _chat(client, key)).status_code == 200:
                        break
                    await asyncio.sleep(0.1)
                assert (await _chat(client, key)).status_code == 200
            # a key made now works on both without a restart
            with PgAdmin(db_url) as admin:
                second = admin.create_key("team-a", "second")
            await asyncio.sleep(1.0)
            assert (await _chat(a, second)).status_code == 200
            assert (await _chat(b, second)).status_code == 200
            # revoked: both refuse it within a second
            with PgAdmin(db_url) as admin:
                admin.revoke("team-a", "ci")
            revoked_at = time.monotonic()
            refused: dict[str, float] = {}
            while len(refused) < 2 and time.monotonic() - revoked_at < 3:
                for name, client in (("a", a), ("b", b)):
                    if name not in refused and (await _chat(client, key)).status_code == 401:
                        refused[name] = time.monotonic() - revoked_at
                await asyncio.sleep(0.02)
            print(f"revocation seen after {refused}")
            assert set(refused) == {"a", "b"} and max(refused.values()) < 1.0
            assert (await _chat(a, second)).status_code == 200  # the other key lives on
            r = await _chat(a, "tg-00000000-" + "x" * 43)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


async def test_the_ledger_adds_up_in_batches(db_url: str) -> None:
    with PgAdmin(db_url) as admin:
        admin.set_tenant(Tenant("team-a", ()))
        key = admin.create_key("team-a", "ci")
    with FakeEngine("ok") as engine:
        settings = _settings(db_url, engine.url)
        async with in_process_gateway(settings) as a, in_process_gateway(settings) as b:
            await asyncio.sleep(1.0)
            for i in range(20):
                r = await _chat((a, b)[i % 2], key)
                assert r.status_code == 200
        # both flushed at shutdown; the FAKE engine's usage: 3 prompt, 1 completion
    with PgAdmin(db_url) as admin:
        rows = admin.usage()
        statements = admin.conn.execute(
            "SELECT n_tup_ins, n_tup_upd FROM pg_stat_user_tables WHERE relname = 'tiergate_usage'"
        ).fetchone()
    assert len(rows) == 1
    row = rows[0]
    assert (row["tenant"], row["key"], row["requests"]) == ("team-a", "ci", 20)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (60, 20)
    # rows written as sums, a few times a second at most, not a row per request
    assert sum(statements or (0, 0)) < 20


async def test_an_outage_keeps_cached_keys_and_the_ledger(server: PgServer, db_url: str) -> None:
    """The database stops under load: known keys keep working, an unknown key gets 503
    (it may be new), nothing answers 500; usage waits and is written on recovery, and
    revocation works again without restarting the gateway."""
    with PgAdmin(db_url) as admin:
        admin.set_tenant(Tenant("team-a", ()))
        key = admin.create_key("team-a", "ci")
    with FakeEngine("ok") as engine:
        settings = _settings(db_url, engine.url)
        async with in_process_gateway(settings) as gw:
            for _ in range(50):
                if (await _chat(gw, key)).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            server.stop()
            try:
                statuses = []
                down_until = time.monotonic() + 5
                while time.monotonic() < down_until:
                    statuses.append((await _chat(gw, key)).status_code)
                    await asyncio.sleep(0.05)
                unknown = await _chat(gw, "tg-0badc0de-" + "y" * 43)
                assert unknown.status_code == 503, unknown.text
                assert unknown.json()["error"]["code"] == "key_store_unavailable"
                assert set(statuses) == {200}, statuses
                served_down = len(statuses)
                down = _gauges(await gw.get("/metrics"))
                assert down["tiergate_tenancy_store_connected"] == 0
                assert down["tiergate_tenancy_store_contact_age_seconds"] >= 4
                assert down["tiergate_tenancy_usage_rows_buffered"] == 1  # one (day, key, tier)
                assert down["tiergate_tenancy_keys"] == 1
            finally:
                server.start()
            # recovered: usage written, and a revoke acts again
            with PgAdmin(db_url) as admin:
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    rows = admin.usage()
                    if rows and rows[0]["requests"] >= served_down + 1:
                        break
                    await asyncio.sleep(0.2)
                assert rows and rows[0]["requests"] == served_down + 1
                admin.revoke("team-a", "ci")
            for _ in range(30):
                if (await _chat(gw, key)).status_code == 401:
                    break
                await asyncio.sleep(0.1)
            assert (await _chat(gw, key)).status_code == 401
            for _ in range(30):  # the gauges are set once a second
                up = _gauges(await gw.get("/metrics"))
                if up["tiergate_tenancy_keys"] == 0:
                    break
                await asyncio.sleep(0.1)
            assert up["tiergate_tenancy_store_connected"] == 1
            assert up["tiergate_tenancy_usage_rows_dropped"] == 0
            assert up["tiergate_tenancy_keys"] == 0  # the revoked key left the snapshot


def _gauges(r) -> dict[str, float]:
    """The tenancy store's gauges from a /metrics answer (reported once a second)."""
    assert r.status_code == 200
    return {
        name: float(value)
        for name, value in (
            line.split(" ", 1)
            for line in r.text.splitlines()
            if line.startswith("tiergate_tenancy_")
        )
    }


def test_keys_cli_against_postgres_from_the_environment(db_url: str, tmp_path) -> None:
    env = {**os.environ, "TIERGATE_TENANCY__DATABASE_URL": db_url}

    def keys(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "serving.cli", "keys", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert keys("tenant", "team-a", "--rpm", "60").returncode == 0
    made = keys("create", "team-a", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert key.startswith("tg-") and key not in keys("list").stdout
    assert "team-a" in keys("list").stdout and "live" in keys("list").stdout
    again = keys("create", "team-a", "ci")
    assert again.returncode == 2 and "already has a key named 'ci'" in again.stderr
    assert keys("revoke", "team-a", "ci").returncode == 0
    assert "revoked" in keys("list").stdout
    assert keys("usage", "--json").stdout.strip() == "[]"
    bad = subprocess.run(
        [sys.executable, "-m", "serving.cli", "keys", "list"],
        cwd=REPO,
        env={**os.environ, "TIERGATE_TENANCY__DATABASE_URL": "mysql://x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "tenancy.database_url" in bad.stderr


async def test_two_gateway_processes_share_keys_limits_and_the_ledger(
    server: PgServer, db_url: str, redis_url: str, gateway, model: str, tmp_path
) -> None:
    """Two `tiergate serve` processes on one PostgreSQL and one Redis, in front of the
    session's real engine: one key works on both, a tenant's rpm is shared, the ledger
    holds what the engine reported (streamed and not), and a revoke reaches both."""
    engine_url = next(e["url"] for e in gateway.engines() if e["ready"] and "smollm2" in e["name"])
    rpm = 30
    with PgAdmin(db_url) as admin:
        admin.set_tenant(Tenant("team-a", (), rpm=rpm))
        key = admin.create_key("team-a", "ci")
    config = tmp_path / "gw.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "engines": [{"name": "real", "model": model, "url": engine_url}],
                "tenancy": {"enabled": True, "redis_url": redis_url},
            }
        )
    )
    env = {"TIERGATE_TENANCY__DATABASE_URL": db_url}
    usage = {"prompt": 0, "completion": 0}
    with (
        GatewayProcess(config, tmp_path / "a.log", env) as a,
        GatewayProcess(config, tmp_path / "b.log", env) as b,
    ):
        a.wait_ready(60)
        b.wait_ready(60)
        headers = {"authorization": f"Bearer {key}"}
        statuses: dict[str, list[int]] = {a.url: [], b.url: []}
        async with httpx.AsyncClient(timeout=60) as http:
            started = time.monotonic()

            async def one(i: int) -> None:
                url = (a.url, b.url)[i % 2]
                body = {"model": model, "prompt": "Hi", "max_tokens": 2, "stream": i % 4 == 1}
                if body["stream"]:
                    body["stream_options"] = {"include_usage": True}
                r = await http.post(url + "/v1/completions", json=body, headers=headers)
                assert r.status_code in (200, 429), r.text
                statuses[url].append(r.status_code)
                if r.status_code == 200:
                    if body["stream"]:
                        last = [ln for ln in r.text.splitlines() if '"usage"' in ln][-1]
                        got = json.loads(last.removeprefix("data: "))["usage"]
                    else:
                        got = r.json()["usage"]
                    usage["prompt"] += got["prompt_tokens"]
                    usage["completion"] += got["completion_tokens"]

            for batch in range(0, 60, 6):
                await asyncio.gather(*(one(i) for i in range(batch, batch + 6)))
            elapsed = time.monotonic() - started
            ok = {url: s.count(200) for url, s in statuses.items()}
            assert all(n > 0 for n in ok.values())
            assert rpm <= sum(ok.values()) <= rpm + elapsed * rpm / 60 + 1  # one bucket
            with PgAdmin(db_url) as admin:
                admin.revoke("team-a", "ci")
            await asyncio.sleep(1.0)
            for gw in (a, b):
                r = await http.post(
                    gw.url + "/v1/completions",
                    json={"model": model, "prompt": "Hi", "max_tokens": 1},
                    headers=headers,
                )
                assert r.status_code == 401, r.text
        assert a.stop(signal.SIGINT) in (0, 130) and b.stop(signal.SIGINT) in (0, 130)
    assert not a.survivors() and not b.survivors()
    with PgAdmin(db_url) as admin:
        rows = admin.usage()
    assert sum(r["requests"] for r in rows) == sum(ok.values())
    assert sum(r["prompt_tokens"] for r in rows) == usage["prompt"]
    assert sum(r["completion_tokens"] for r in rows) == usage["completion"]
