"""Attacks on the keys, sent as raw HTTP to the gateway on a real server (FAKE engine
behind it): each is refused with a 401 in the OpenAI shape, and no key shows in
anything the gateway wrote (its audit log included)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from serving.config import Settings
from serving.tenants.store import Tenant, TenantStore
from tests.fake_engine import FakeEngine
from tests.test_load_accounting_fake import served

pytestmark = pytest.mark.anyio
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def raw(
    url: str, head: list[str], path: str = "/v1/chat/completions", method: str = "POST"
) -> tuple[int, dict]:
    """One request with exactly these header lines; (status, JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines += [f"Content-Length: {len(BODY)}", "Connection: close", *head]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + BODY)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    status = int(data.split(b" ", 2)[1])
    body = data.split(b"\r\n\r\n", 1)[1]
    return status, json.loads(body) if body.startswith(b"{") else {}


async def test_each_attack_is_refused_and_no_key_is_logged(tmp_path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    db = tmp_path / "tenants.sqlite3"
    with TenantStore(db) as store:
        store.set_tenant(Tenant("team-a", ()))
        key = store.create_key("team-a", "ci")
        gone = store.create_key("team-a", "old")
    with FakeEngine("ok") as engine:
        settings = Settings(
            engines=[{"name": "e", "model": "m", "url": engine.url}],
            server={"access_log": "json", "api_keys": ["operator-key-123"]},
            tenancy={"enabled": True, "db": str(db)},
            timeouts={"health_interval": 0.1},
        )
        async with served(settings) as (_, url):
            assert (await raw(url, [f"Authorization: Bearer {key}"]))[0] == 200  # the control
            # "old" is used, so the gateway holds its answer; then revoked by the CLI's
            # connection: the next request must be refused all the same
            assert (await raw(url, [f"Authorization: Bearer {gone}"]))[0] == 200
            with TenantStore(db) as store:
                store.revoke("team-a", "old")
            attacks = {
                "no header": [],
                "no scheme": [f"Authorization: {key}"],
                "wrong scheme": [f"Authorization: Basic {key}"],
                "token scheme": [f"Authorization: Token {key}"],
                "empty bearer": ["Authorization: Bearer"],
                "key in the query string": [],  # sent as ?api_key= below
                "key with spaces and more after it": [f"Authorization: Bearer {key}  x"],
                "key in upper case": [f"Authorization: Bearer {key.upper()}"],
                "key in lower case": [f"Authorization: Bearer {key.lower()}"],
                "key cut short": [f"Authorization: Bearer {key[:-1]}"],
                "duplicate headers, good first": [
                    f"Authorization: Bearer {key}",
                    "Authorization: Bearer nope",
                ],
                "duplicate headers, good last": [
                    "Authorization: Bearer nope",
                    f"Authorization: Bearer {key}",
                ],
                "duplicate headers, both good": [
                    f"Authorization: Bearer {key}",
                    f"Authorization: Bearer {key}",
                ],
                "a 64 KiB header": ["Authorization: Bearer tg-" + "a" * 65536],
                "a revoked key still in the gateway's cache": [f"Authorization: Bearer {gone}"],
            }
            results = {}
            for name, head in attacks.items():
                path = "/v1/chat/completions"
                if name == "key in the query string":
                    path += f"?api_key={key}"
                results[name] = await raw(url, head, path)
            models = await raw(url, ["Authorization: Bearer nope"], "/v1/models", "GET")
            dup = [f"Authorization: Bearer {key}"] * 2
            models_dup = await raw(url, dup, "/v1/models", "GET")
    out = capsys.readouterr()
    for name, (status, body) in results.items():
        assert status == 401, name
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert error["code"] == "invalid_api_key", name
    assert models[0] == 401 and models_dup[0] == 401
    assert models[1]["error"]["code"] == "invalid_api_key"
    written = out.out + out.err + caplog.text
    secret = key[12:]
    assert secret not in written and gone[12:] not in written
    assert "operator-key-123" not in written
    audit = [json.loads(line) for line in out.out.splitlines() if line.startswith("{")]
    assert audit[0]["tenant"] == "team-a" and audit[0]["key"] == "ci"  # names, not keys
    assert [line["status"] for line in audit[2:]] == [401] * len(attacks)  # refusals logged
    print(f"{len(results)} attacks, each refused with 401")
