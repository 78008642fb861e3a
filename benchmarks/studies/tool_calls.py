"""Tool calls through a running gateway: how often each `tool_choice` comes back as a
call whose arguments parse and fit the tool's schema (RESULTS.md, "Tool calls on the
default config").

    python -m benchmarks.studies.tool_calls --base-url http://127.0.0.1:8000 --tries 10

Each try is one chat at the model's default sampling (no temperature sent), one of ten
prompts about the weather or the time in turn, with two tools offered; `auto` counts
calls and prose answers apart.
"""

from __future__ import annotations

import argparse
import json
import sys

import jsonschema
from openai import OpenAI

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
TIME = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PROMPTS = [
    "What is the weather in Paris?",
    "Will it rain in Tokyo tomorrow?",
    "How warm is it in Cairo right now, in Fahrenheit?",
    "What time is it in New York?",
    "Is it snowing in Oslo?",
    "Tell me the current local time in Sydney.",
    "I am flying to Lima. What weather should I pack for?",
    "Weather report for Berlin, please, in Celsius.",
    "What hour is it in Mumbai at the moment?",
    "Is it sunny in Buenos Aires today?",
]
CHOICES = {
    "required": "required",
    "named": {"type": "function", "function": {"name": "get_weather"}},
    "auto": "auto",
}


def fits(calls) -> bool:
    try:
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    except (ValueError, KeyError, jsonschema.ValidationError):
        return False
    return bool(calls)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--choices", nargs="+", default=list(CHOICES), choices=list(CHOICES))
    p.add_argument("--temperature", type=float, help="sent with each request (default: none)")
    a = p.parse_args(argv)
    client = OpenAI(base_url=a.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    extra = {} if a.temperature is None else {"temperature": a.temperature}
    print(
        "| tool_choice | tries | calls that fit the schema | calls that do not"
        " | cut at max_tokens | no call |"
    )
    print("|---|---|---|---|---|---|")
    for label in a.choices:
        choice = CHOICES[label]
        good = bad = cut = none = 0
        for i in range(a.tries):
            reply = client.chat.completions.create(
                model=a.model,
                messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                tools=TOOLS,
                tool_choice=choice,
                max_tokens=a.max_tokens,
                **extra,
            )
            calls = reply.choices[0].message.tool_calls or []
            if reply.choices[0].finish_reason == "length":
                cut += 1  # arguments end mid-value: finish_reason says so
            elif not calls:
                none += 1
            elif fits(calls):
                good += 1
            else:
                bad += 1
        print(f"| {label} | {a.tries} | {good} | {bad} | {cut} | {none} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
