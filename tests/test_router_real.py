"""The tiering router on two real vLLM-CPU engines (configs/tiers-cpu.yaml).

Both tiers serve the same SmolLM2 weights with different limits, over the same
two engines as replicas. The last test kills an engine under load.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from tests.utils import REPO, GatewayProcess

CONFIG = REPO / "configs" / "tiers-cpu.yaml"
SHORT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def tiers(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("tiers")
    log = folder / "serve.log"
    # The shipped layout, with vLLM's dev endpoints on (loopback only) so that a test can
    # empty an engine's prefix cache (POST /reset_prefix_cache: AllBlocksCleared).
    data = yaml.safe_load(CONFIG.read_text())
    for engine in data["engines"]:
        engine["env"]["VLLM_SERVER_DEV_MODE"] = "1"
    config = folder / "tiers.yaml"
    config.write_text(yaml.safe_dump(data))
    with GatewayProcess(config, log) as gw:
        gw.wait_ready()
        gw.wait_for(lambda: all(e["ready"] for e in gw.engines()), 300, "both engines")
        yield gw
    assert not gw.survivors(), f"processes left after stop: {gw.survivors()}"


def _chat(gw: GatewayProcess, body: dict, headers: dict | None = None) -> httpx.Response:
    body = {"max_tokens": 4, **body}
    return httpx.post(gw.url + "/v1/chat/completions", json=body, headers=headers, timeout=120)


def test_models_lists_tiers_and_auto(tiers: GatewayProcess) -> None:
    data = tiers.get("/v1/models").json()["data"]
    assert [(m["id"], m["tier"]) for m in data] == [
        ("smollm2-small", "small"),
        ("smollm2-large", "large"),
        ("auto", None),
    ]
    assert [m["max_model_len"] for m in data] == [1024, 2048, 2048]


@pytest.mark.parametrize(
    ("body", "headers", "tier", "reason"),
    [
        ({"model": "auto", "messages": SHORT}, None, "small", "default"),
        (
            {"model": "auto", "messages": SHORT, "response_format": {"type": "json_object"}},
            None,
            "large",
            "tools",
        ),
        (
            {"model": "auto", "messages": [{"role": "user", "content": "word " * 600}]},
            None,
            "large",
            "long_prompt",
        ),
        ({"model": "auto", "messages": SHORT, "max_tokens": 300}, None, "large", "long_output"),
        ({"model": "auto", "messages": SHORT}, {"x-tiergate-tier": "large"}, "large", "hint"),
        (
            {"model": "auto", "messages": SHORT, "metadata": {"tier": "large"}},
            None,
            "large",
            "hint",
        ),
        ({"model": "smollm2-small", "messages": SHORT}, None, "small", "explicit"),
    ],
)
def test_auto_picks_the_tier_the_rules_say(
    tiers: GatewayProcess, body: dict, headers: dict | None, tier: str, reason: str
) -> None:
    r = _chat(tiers, body, headers)
    assert r.status_code == 200, r.text
    assert r.headers["x-tiergate-tier"] == tier
    tier_reason, replica_reason = r.headers["x-tiergate-reason"].split("+")
    assert tier_reason == reason and replica_reason in ("prefix", "session", "load")
    assert r.headers["x-tiergate-replica"] in ("smollm2-a", "smollm2-b")
    assert r.json()["choices"][0]["message"]["content"] is not None
    metrics = tiers.get("/metrics").text
    assert re.search(
        rf'tiergate_router_decisions_total{{reason="{reason}",tier="{tier}"}} '
        r"[1-9]",
        metrics,
    )


def test_auto_streams_with_headers(tiers: GatewayProcess) -> None:
    body = {"model": "auto", "messages": SHORT, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", tiers.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["x-tiergate-tier"] == "small"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"


def test_over_the_tier_limit_is_refused_by_the_engine_not_lost(tiers: GatewayProcess) -> None:
    r = _chat(tiers, {"model": "auto", "messages": [{"role": "user", "content": "word " * 3000}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_tier_limits_are_enforced_for_explicit_requests(tiers: GatewayProcess) -> None:
    # The engines allow 2048 tokens; the small tier promises only 1024 and 256 out.
    r = _chat(tiers, {"model": "smollm2-small", "messages": SHORT, "max_tokens": 300})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens" and "256" in r.json()["error"]["message"]
    long = [{"role": "user", "content": "word " * 1200}]
    r = _chat(tiers, {"model": "smollm2-small", "messages": long})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "1024" in err["message"]
    assert _chat(tiers, {"model": "smollm2-large", "messages": long}).status_code == 200


def _prefix_hits(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(v)
        for v in re.findall(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", text, re.M)
    )


def test_affinity_keeps_a_session_on_one_replica_and_hits_its_prefix_cache(
    tiers: GatewayProcess,
) -> None:
    engines = {e["name"]: e["url"] for e in tiers.engines()}
    system = {
        "role": "system",
        "content": "You are a terse assistant. "
        + "Rules: "
        + ("answer briefly, never apologise, prefer facts. " * 40),
    }
    history = [system]
    replicas, before = [], {n: _prefix_hits(u) for n, u in engines.items()}
    for turn in range(4):
        history.append({"role": "user", "content": f"Question {turn}: name a colour."})
        r = _chat(tiers, {"model": "smollm2-small", "messages": history}, {"x-session-id": "alice"})
        assert r.status_code == 200
        replicas.append(r.headers["x-tiergate-replica"])
        history.append(
            {"role": "assistant", "content": r.json()["choices"][0]["message"]["content"] or "red"}
        )
    assert len(set(replicas)) == 1, replicas
    home = replicas[0]
    after = {n: _prefix_hits(u) for n, u in engines.items()}
    assert after[home] - before[home] >= 3 * 256  # turns 2-4 reused the long system prompt
    other = next(n for n in engines if n != home)
    assert after[other] == before[other]

    homes = {
        _chat(
            tiers, {"model": "smollm2-small", "messages": SHORT}, {"x-session-id": f"user-{i}"}
        ).headers["x-tiergate-replica"]
        for i in range(12)
    }
    assert homes == {"smollm2-a", "smollm2-b"}  # sessions spread over both


SYSTEM = {
    "role": "system",
    "content": "Reference notes. "
    + " ".join(f"Item {i} is filed under shelf {i % 7}." for i in range(90)),
}


def test_prefix_routing_follows_the_engines_kv_events(tiers: GatewayProcess) -> None:
    """A long system prompt lands on one engine; its KV events fill that replica's index
    with keys the router computes from token ids, so later prompts with the same
    system prompt go there, though the other engine is idle (no session id)."""
    first = _chat(
        tiers, {"model": "smollm2-large", "messages": [SYSTEM, {"role": "user", "content": "Hi."}]}
    )
    assert first.status_code == 200, first.text
    prompt = first.json()["usage"]["prompt_tokens"]
    assert prompt >= 5 * 128
    home = first.headers["x-tiergate-replica"]
    blocks = prompt // 128
    tiers.wait_for(lambda: tiers.engine(home)["prefix_index"]["blocks"] >= blocks, 10, "the events")
    index = tiers.engine(home)["prefix_index"]
    assert index["source"] == "events" and index["events"] >= 1 and index["staleness_s"] >= 0
    time.sleep(5.5)  # past router.prefix.pending_s: only the engine's events vouch now
    engines = {e["name"]: e["url"] for e in tiers.engines()}
    hits_before = _prefix_hits(engines[home])
    for q in range(3):
        messages = [SYSTEM, {"role": "user", "content": f"Which shelf holds item {q}?"}]
        r = _chat(tiers, {"model": "smollm2-large", "messages": messages})
        assert r.status_code == 200
        assert (r.headers["x-tiergate-replica"], r.headers["x-tiergate-reason"]) == (
            home,
            "explicit+prefix",
        )
    assert _prefix_hits(engines[home]) - hits_before >= 3 * (blocks - 1) * 128
    metrics = tiers.get("/metrics").text
    received = re.search(
        rf'tiergate_kv_events_total{{engine="{home}",outcome="received"}} ([0-9.]+)', metrics
    )
    assert received and float(received[1]) >= 1
    matched = re.search(r'tiergate_prefix_matched_tokens_total{tier="large"} ([0-9.]+)', metrics)
    assert matched and float(matched[1]) >= 3 * (blocks - 1) * 128
    assert re.search(
        rf'tiergate_prefix_index_blocks{{engine="{home}",source="events"}} [1-9]', metrics
    )

    # AllBlocksCleared: the engine empties its cache, and the index follows within 1 s of
    # the event. vLLM publishes events at its next step, so one short request (no full
    # block of its own) is sent to that engine directly.
    assert httpx.post(engines[home] + "/reset_prefix_cache", timeout=10).status_code == 200
    model = tiers.engine(home)["model"]
    body = {"model": model, "prompt": "Hi", "max_tokens": 1}
    assert httpx.post(engines[home] + "/v1/completions", json=body, timeout=60).status_code == 200
    tiers.wait_for(lambda: tiers.engine(home)["prefix_index"]["blocks"] == 0, 1.0, "cleared")


def test_stored_responses_continue_on_the_replica_that_stores_them(
    tiers: GatewayProcess,
) -> None:
    """store, previous_response_id, GET and cancel with two replicas, through the SDK:
    the id names the replica, so every turn and every read finds the stored response."""
    from openai import NotFoundError, OpenAI

    client = OpenAI(base_url=tiers.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    first = client.responses.create(
        model="smollm2-small", input="My name is Ada.", store=True, max_output_tokens=8
    )
    assert first.id.startswith("resp_") and "~" in first.id
    ids, homes, prompt_tokens = [first.id], set(), [first.usage.input_tokens]
    for turn in range(4):  # placement alone would spread these over both replicas
        reply = client.responses.with_raw_response.create(
            model="smollm2-small",
            input=f"Turn {turn}: what is my name?",
            previous_response_id=ids[-1],
            store=True,
            max_output_tokens=8,
        )
        homes.add(reply.headers["x-tiergate-replica"])
        assert reply.headers["x-tiergate-reason"].endswith("+stored")
        parsed = reply.parse()
        assert parsed.previous_response_id == ids[-1]  # the public id, echoed
        ids.append(parsed.id)
        prompt_tokens.append(parsed.usage.input_tokens)
    previous = parsed
    assert len(homes) == 1
    # each turn's prompt holds the turns before it: the engine found them all
    assert prompt_tokens == sorted(set(prompt_tokens)), prompt_tokens
    # a stream continues it too, and its events carry the public ids
    with client.responses.stream(
        model="smollm2-small",
        input="Once more.",
        previous_response_id=previous.id,
        max_output_tokens=8,
    ) as stream:
        final = stream.get_final_response()
    assert "~" in final.id and final.previous_response_id == previous.id
    got = client.responses.retrieve(previous.id)
    assert got.id == previous.id and got.output_text == previous.output_text
    # a finished response cannot be cancelled: the engine's 400, in our envelope
    r = httpx.post(f"{tiers.url}/v1/responses/{previous.id}/cancel", timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    for unknown in ("resp_nothing", "resp_mfxgc4q~0123", previous.id[:-4] + "0000"):
        with pytest.raises(NotFoundError):
            client.responses.retrieve(unknown)


def _one(url: str, i: int, counts: dict, lock: threading.Lock) -> None:
    stream = i % 2 == 1
    body = {
        "model": "auto" if i % 4 < 2 else "smollm2-small",
        "max_tokens": 24,
        "ignore_eos": True,
        "stream": stream,
        "messages": [{"role": "user", "content": f"Request {i}: tell me about rivers."}],
    }
    kind = "stream" if stream else "unary"
    try:
        if not stream:
            r = httpx.post(url, json=body, timeout=120)
            ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 24
            outcome = "ok" if ok else f"http_{r.status_code}"
        else:
            with httpx.stream("POST", url, json=body, timeout=120) as r:
                if r.status_code != 200:
                    outcome = f"http_{r.status_code}"
                else:
                    events = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
                    errors = [e for e in events[:-1] if '"error"' in e]
                    if events[-1] != "[DONE]":
                        outcome = "no_done"
                    elif not errors:
                        outcome = "ok"
                    elif len(errors) == 1 and events[-2] == errors[0]:
                        assert json.loads(errors[0])["error"]["message"]
                        outcome = "error_event_then_done"
                    else:
                        outcome = "bad_shape"
    except httpx.HTTPError as exc:
        outcome = f"exception_{type(exc).__name__}"
    with lock:
        counts.setdefault(kind, {}).setdefault(outcome, 0)
        counts[kind][outcome] += 1


def _in_flight_on(gw: GatewayProcess, name: str) -> bool:
    return any(e["name"] == name and e["in_flight"] > 0 for e in gw.engines())


def test_killing_one_engine_under_load_loses_no_request(tiers: GatewayProcess) -> None:
    """Auto and explicit requests, streamed and not, while one engine is SIGKILLed: no
    refusal while the other is ready, and the dead one's prefix index is gone at once."""
    n, concurrency = 120, 8  # ~80 of them after the kill: the suite's budget
    url = tiers.url + "/v1/chat/completions"
    # give the victim something in its index (a long prompt, routed where it likes) and
    # a stored response, which must be a clear 404 once it is dead
    seeded = httpx.post(
        tiers.url + "/v1/responses",
        json={
            "model": "smollm2-large",
            "instructions": SYSTEM["content"],
            "input": "Seed the cache.",
            "store": True,
            "max_output_tokens": 4,
        },
        timeout=120,
    )
    assert seeded.status_code == 200, seeded.text
    name, stored_id = seeded.headers["x-tiergate-replica"], seeded.json()["id"]
    other = next(e["name"] for e in tiers.engines() if e["name"] != name)
    tiers.wait_for(lambda: tiers.engine(name)["prefix_index"]["blocks"] > 0, 10, "events")
    victim = tiers.engine(name)
    counts: dict = {}
    lock = threading.Lock()
    done = 0
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(_one, url, i, counts, lock) for i in range(n)]
        # kill it with requests on it, so that there is something to fail over
        while done < 40 or not _in_flight_on(tiers, name):
            done = sum(f.done() for f in futures)
            time.sleep(0.02)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at, killed = done, time.monotonic()
        tiers.wait_for(lambda: tiers.engine(name)["prefix_index"]["blocks"] == 0, 1.0, "forget")
        forgotten = time.monotonic() - killed
        read = httpx.get(f"{tiers.url}/v1/responses/{stored_id}", timeout=30)
        assert read.status_code == 404, read.text  # not held for its restart: it is gone
        assert "gone" in read.json()["error"]["message"] and name in read.text
        for f in futures:
            f.result()
    print(f"failover: {n} requests, engine killed after {killed_at} finished: {counts}")
    print(f"the killed engine's index was empty {forgotten:.2f} s after the kill")
    assert sum(sum(v.values()) for v in counts.values()) == n
    assert counts["unary"] == {"ok": n // 2}, counts  # every non-streamed request succeeded
    assert set(counts["stream"]) <= {"ok", "error_event_then_done"}, counts
    metrics = tiers.get("/metrics").text
    assert re.search(
        rf'tiergate_retries_total\{{reason="[a-z_]+",replica="{other}",'
        r'tier="(small|large)"\} [1-9]',
        metrics,
    ), "failover went through retries"
