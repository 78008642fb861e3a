"""`tiergate eval`: a quality gate for any OpenAI-compatible endpoint.

    # the golden set: score per item, overall, pass/fail against --threshold
    tiergate eval --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct
    # agreement with a reference engine (e.g. AWQ vs bf16 of the same model)
    tiergate eval --base-url http://q:8000 --model m-awq \\
        --reference-url http://ref:8000 --reference-model m --min-first-token 0.9

Greedy chat completions (temperature 0). Exit code 0 when the gate passes, 1 when it
fails, 2 when the endpoint could not be asked. `--json PATH` writes the full report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.quality.scoring import GoldenItem, agreement, load_golden, score_answer


class EvalError(Exception):
    """The endpoint could not be asked (network, HTTP status, malformed answer)."""


async def ask(
    http: httpx.AsyncClient,
    base_url: str,
    model: str,
    item: GoldenItem,
    max_tokens: int,
    token_ids: bool = False,
) -> dict[str, Any]:
    """One greedy answer: its text and, if asked for and the server gives them, token ids."""
    body: dict[str, Any] = {
        "model": model,
        "messages": item.messages(),
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if token_ids:
        body["return_token_ids"] = True  # vLLM's extension; strict servers refuse it
    try:
        r = await http.post(base_url.rstrip("/") + "/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        raise EvalError(f"{base_url}: {type(exc).__name__}: {exc}") from exc
    if r.status_code != 200:
        raise EvalError(f"{base_url}: HTTP {r.status_code}: {r.text[:300]}")
    try:
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise EvalError(f"{base_url}: malformed answer: {r.text[:300]}") from exc
    return {"text": text, "token_ids": choice.get("token_ids")}


async def answers(
    base_url: str,
    model: str,
    items: list[GoldenItem],
    max_tokens: int,
    concurrency: int,
    api_key: str | None,
    timeout: float,
    token_ids: bool = False,
) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:

        async def one(item: GoldenItem) -> dict[str, Any]:
            async with limit:
                return await ask(http, base_url, model, item, max_tokens, token_ids)

        return await asyncio.gather(*(one(item) for item in items))


def golden_report(items: list[GoldenItem], got: list[dict[str, Any]], threshold: float) -> dict:
    rows = []
    for item, answer in zip(items, got, strict=True):
        passed, why = score_answer(item, answer["text"])
        rows.append(
            {
                "id": item.id,
                "kind": item.kind,
                "required": item.required,
                "passed": passed,
                "why": why,
                **answer,
            }
        )
    score = sum(r["passed"] for r in rows) / len(rows)
    by_kind: dict[str, list[bool]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r["passed"])
    missed = [r["id"] for r in rows if r["required"] and not r["passed"]]
    return {
        "mode": "golden",
        "items": rows,
        "score": score,
        "by_kind": {k: sum(v) / len(v) for k, v in by_kind.items()},
        "threshold": threshold,
        "required_failed": missed,
        "passed": score >= threshold and not missed,
    }


def agreement_report(
    ref: list[dict[str, Any]], test: list[dict[str, Any]], min_first: float, min_prefix: float
) -> dict:
    tokens = all(a["token_ids"] is not None for a in ref + test)
    unit = "tokens" if tokens else "words"

    def seq(a: dict[str, Any]) -> list:
        return a["token_ids"] if tokens else a["text"].split()

    result = agreement([(seq(r), seq(t)) for r, t in zip(ref, test, strict=True)])
    return {
        "mode": "agreement",
        "unit": unit,
        **asdict(result),
        "min_first_token_match": min_first,
        "min_mean_prefix": min_prefix,
        "passed": result.first_token_match >= min_first
        and result.mean_matching_prefix >= min_prefix,
        "pairs": [
            {"reference": r["text"], "test": t["text"]} for r, t in zip(ref, test, strict=True)
        ],
    }


def render(report: dict[str, Any]) -> str:
    verdict = "PASS" if report["passed"] else "FAIL"
    if report["mode"] == "agreement":
        return (
            f"agreement over {report['prompts']} prompts ({report['unit']}): identical "
            f"{report['exact_match']:.0%}, first token {report['first_token_match']:.0%}, "
            f"mean matching prefix {report['mean_matching_prefix']:.1f} -> {verdict} "
            f"(needs first token >= {report['min_first_token_match']:.0%}, "
            f"prefix >= {report['min_mean_prefix']:.1f})"
        )
    width = max(len(r["id"]) for r in report["items"]) + 1
    lines = [f"{'item':<{width}}  ok  answer"]
    for r in report["items"]:
        text = " ".join(r["text"].split())[:70]
        name = r["id"] + ("*" if r["required"] else "")
        lines.append(f"{name:<{width}}  {'yes' if r['passed'] else 'NO ':<3} {text}")
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in report["by_kind"].items())
    missed = report["required_failed"]
    lines.append(
        f"score {report['score']:.0%} ({sum(r['passed'] for r in report['items'])}/"
        f"{len(report['items'])}; {kinds}) -> {verdict} (threshold {report['threshold']:.0%}"
        + (f"; required item failed: {', '.join(missed)})" if missed else "; * = required)")
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tiergate eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--golden", type=Path, default=None, help="golden set YAML (the shipped one)")
    p.add_argument("--threshold", type=float, default=0.8, help="share of items that must pass")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--limit", type=int, help="ask only the first N items")
    p.add_argument("--reference-url", help="compare with this endpoint instead of scoring")
    p.add_argument("--reference-model")
    p.add_argument("--min-first-token", type=float, default=0.8)
    p.add_argument("--min-prefix", type=float, default=4.0, help="mean matching prefix")
    p.add_argument(
        "--no-token-ids",
        action="store_true",
        help="agreement in words: for servers that refuse vLLM's return_token_ids",
    )
    p.add_argument("--json", type=Path, help="write the full report here")
    p.add_argument("--quiet", action="store_true", help="print only the last line")
    return p


def evaluate(a: argparse.Namespace) -> dict[str, Any]:
    items = load_golden(a.golden) if a.golden else load_golden()
    items = items[: a.limit] if a.limit else items
    common = (a.max_tokens, a.concurrency, a.api_key, a.timeout)
    if not a.reference_url:
        test = asyncio.run(answers(a.base_url, a.model, items, *common))
        report = golden_report(items, test, a.threshold)
    else:
        ids = not a.no_token_ids
        test = asyncio.run(answers(a.base_url, a.model, items, *common, ids))
        ref_model = a.reference_model or a.model
        ref = asyncio.run(answers(a.reference_url, ref_model, items, *common, ids))
        report = agreement_report(ref, test, a.min_first_token, a.min_prefix)
    return {"base_url": a.base_url, "model": a.model, **report}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        report = evaluate(a)
    except EvalError as exc:
        print(f"tiergate eval: error: {exc}", file=sys.stderr)
        return 2
    text = render(report)
    print(text.splitlines()[-1] if a.quiet else text)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
