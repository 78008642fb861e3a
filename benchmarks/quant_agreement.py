"""Output agreement of a quantized engine with the reference one: the same prompts,
greedy decoding, and how many leading tokens match.

    python -m benchmarks.quant_agreement --ref http://127.0.0.1:8223 --ref-model f \\
        --test http://127.0.0.1:8222 --test-model q

Reports exact-match rate of whole answers, mean matching prefix (in tokens) and the
share of first tokens that agree, over `--prompts` questions.
"""

from __future__ import annotations

import argparse
import json
import statistics

import httpx

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Who wrote Romeo and Juliet?",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water?",
    "Translate 'thank you' into Spanish.",
    "What is the largest planet in our solar system?",
    "Give me a synonym for happy.",
    "What does CPU stand for?",
    "How many days are in a leap year?",
    "What is the chemical symbol for gold?",
    "Name a famous painting by Leonardo da Vinci.",
    "What is the square root of 81?",
    "Which ocean is the largest?",
    "What language is spoken in Brazil?",
    "Write a haiku about the sea.",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Starry Night?",
    "What is the speed of light, roughly?",
]


def answer(url: str, model: str, question: str, tokens: int) -> list[int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": tokens,
        "temperature": 0,
        "return_token_ids": True,
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    return r.json()["choices"][0]["token_ids"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True)
    p.add_argument("--ref-model", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--test-model", required=True)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args(argv)
    prefix, exact, first = [], 0, 0
    for q in QUESTIONS:
        ref = answer(a.ref, a.ref_model, q, a.tokens)
        test = answer(a.test, a.test_model, q, a.tokens)
        n = next(
            (i for i, (x, y) in enumerate(zip(ref, test, strict=False)) if x != y),
            min(len(ref), len(test)),
        )
        prefix.append(n)
        exact += ref == test
        first += bool(ref and test and ref[0] == test[0])
    print(
        json.dumps(
            {
                "prompts": len(QUESTIONS),
                "max_tokens": a.tokens,
                "exact_match": exact / len(QUESTIONS),
                "first_token_match": first / len(QUESTIONS),
                "mean_matching_prefix": statistics.mean(prefix),
                "median_matching_prefix": statistics.median(prefix),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
