"""The README's chat and Responses examples through a running gateway: how often each
answers "Paris", at the model's default sampling and at temperatures sent by the client
(RESULTS.md, "Sampling defaults on the default config").

    python -m benchmarks.studies.readme_answers --base-url http://127.0.0.1:8000 --runs 30 \
        --temperatures default 0.2 0.1 0
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from openai import OpenAI

QUESTION = "What is the capital of France?"


def ask(client: OpenAI, model: str, api: str, extra: dict[str, Any]) -> str:
    if api == "chat":
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTION}],
            max_tokens=30,
            **extra,
        )
        return reply.choices[0].message.content or ""
    return client.responses.create(
        model=model, input=QUESTION, max_output_tokens=30, **extra
    ).output_text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--temperatures", nargs="+", default=["default"])
    a = p.parse_args(argv)
    client = OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    print("| temperature | chat: Paris | Responses: Paris |")
    print("|---|---|---|")
    for t in a.temperatures:
        extra = {} if t == "default" else {"temperature": float(t)}
        counts = [
            sum("Paris" in ask(client, a.model, api, extra) for _ in range(a.runs))
            for api in ("chat", "responses")
        ]
        label = "none sent (the manifest's)" if t == "default" else t
        print(f"| {label} | {counts[0]} of {a.runs} | {counts[1]} of {a.runs} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
