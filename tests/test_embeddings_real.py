"""Embeddings on the default config, for real: the official SDK against the gateway,
whose second engine is vLLM's pooling runner serving all-MiniLM-L6-v2; the vectors
checked against transformers running the same weights here."""

from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import pytest
from openai import OpenAI

from models.manifest import load_manifest
from models.prepare import resolve_source

EMBED = "all-minilm-l6-v2"

# (a sentence, one that means much the same, one about something else)
PAIRS = [
    ("The cat sleeps on the sofa.", "A kitten is napping on the couch.",
     "Interest rates rose again."),
    ("How do I reset my password?", "I forgot my password and need a new one.",
     "The river flooded the town."),
    ("The train to Paris leaves at nine.", "Our Paris train departs at 9 o'clock.",
     "She planted tomatoes in May."),
    ("This soup is too salty.", "There is far too much salt in the soup.",
     "The server restarted overnight."),
    ("He scored the winning goal.", "His goal won the match.", "Photosynthesis needs light."),
    ("The invoice is overdue.", "The bill has not been paid on time.",
     "Whales sing to each other."),
    ("It will rain tomorrow.", "Tomorrow's forecast says showers.",
     "The novel has twelve chapters."),
    ("Add two cups of flour.", "Mix in 2 cups of flour.", "The satellite reached orbit."),
    ("The laptop battery died.", "My notebook computer ran out of charge.", "Lions hunt at dusk."),
    ("Close the window, it's cold.", "Shut the window; it is chilly.", "Stocks fell on Monday."),
]  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    """all-MiniLM-L6-v2 in transformers, float32: mean pooling over the attention mask,
    then L2 normalization, as its sentence-transformers modules say."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_source(load_manifest(EMBED))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return embed


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sdk_embeddings_rank_pairs_and_match_transformers(client: OpenAI, reference) -> None:
    texts = [t for triple in PAIRS for t in triple]
    # the SDK asks for base64 and decodes it; one batch of 30
    got = client.embeddings.create(model=EMBED, input=texts)
    assert got.model and len(got.data) == len(texts)
    assert [d.index for d in got.data] == list(range(len(texts)))
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (30, 384)
    assert got.usage.prompt_tokens > 30 and got.usage.total_tokens == got.usage.prompt_tokens
    want = reference(texts)
    distances = [1 - _cos(v, w) for v, w in zip(vectors, want, strict=True)]
    assert max(distances) < 1e-3, distances
    margins = []
    for i in range(len(PAIRS)):
        a, similar, other = vectors[3 * i : 3 * i + 3]
        margins.append(_cos(a, similar) - _cos(a, other))
        assert margins[-1] > 0.1, PAIRS[i]
    print(  # benchmarks/RESULTS.md, "Embeddings on the default config"
        f"\nembeddings: max cosine distance to transformers {max(distances):.2e}; similar "
        f"minus unrelated cosine: min {min(margins):.3f}, median {np.median(margins):.3f}"
    )


def test_float_and_base64_encodings_and_token_ids_agree(gateway) -> None:
    url = gateway.url + "/v1/embeddings"
    floats = httpx.post(url, json={"model": EMBED, "input": "hello world"}, timeout=60)
    assert floats.status_code == 200, floats.text
    assert floats.headers["x-tiergate-tier"] == EMBED
    assert floats.headers["x-tiergate-reason"].startswith("explicit+")
    as_floats = floats.json()["data"][0]["embedding"]
    packed = httpx.post(
        url,
        json={"model": EMBED, "input": ["hello world"], "encoding_format": "base64"},
        timeout=60,
    ).json()["data"][0]["embedding"]
    raw = base64.b64decode(packed)
    as_b64 = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert len(as_floats) == len(as_b64) == 384
    assert np.allclose(as_floats, as_b64, atol=1e-6)
    # `auto` finds the embedding tier; token ids are taken as the text's
    auto = httpx.post(url, json={"model": "auto", "input": "hello world"}, timeout=60)
    assert auto.status_code == 200 and auto.headers["x-tiergate-reason"].startswith("embedding+")
    assert np.allclose(auto.json()["data"][0]["embedding"], as_floats, atol=1e-5)
    ids = [101, 7592, 2088, 102]  # [CLS] hello world [SEP] in its vocabulary
    by_ids = httpx.post(url, json={"model": EMBED, "input": [ids]}, timeout=60)
    assert by_ids.status_code == 200, by_ids.text
    assert np.allclose(by_ids.json()["data"][0]["embedding"], as_floats, atol=1e-4)


def test_models_list_the_embedding_model(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert EMBED in ids and "smollm2-135m-instruct" in ids


def test_rerank_and_score_through_the_gateway(gateway) -> None:
    query, documents = (
        "Where does the train leave from?",
        [
            "Bananas are rich in potassium.",
            "The train departs from platform four.",
            "He painted the fence green.",
        ],
    )
    r = httpx.post(
        gateway.url + "/v1/rerank",
        json={"model": EMBED, "query": query, "documents": documents, "top_n": 2},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 2 and results[0]["index"] == 1
    assert results[0]["relevance_score"] > results[1]["relevance_score"]
    assert r.json()["usage"]["prompt_tokens"] > 0
    s = httpx.post(
        gateway.url + "/v1/score",
        json={"model": EMBED, "text_1": query, "text_2": documents},
        timeout=60,
    )
    assert s.status_code == 200, s.text
    scores = [d["score"] for d in s.json()["data"]]
    assert len(scores) == 3 and max(scores) == scores[1]


def test_embedding_mistakes_get_openai_errors(gateway, client: OpenAI) -> None:
    url = gateway.url + "/v1/embeddings"
    too_long = " ".join(["word"] * 600)  # past the model's 256 tokens
    cases = [
        ({"model": EMBED, "input": too_long}, 400),
        ({"model": "smollm2-135m-instruct", "input": "x"}, 400),
        ({"model": EMBED, "input": ""}, 400),
        ({"model": EMBED, "input": [[]]}, 400),
        ({"model": EMBED, "input": "x", "dimensions": 0}, 400),
    ]
    for body, status in cases:
        r = httpx.post(url, json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    chat = httpx.post(
        gateway.url + "/v1/chat/completions",
        json={"model": EMBED, "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "model_not_supported"
    # the engine is still fine after all of them
    assert len(client.embeddings.create(model=EMBED, input="still here").data[0].embedding) == 384
