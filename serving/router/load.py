"""Engine load from vLLM's /metrics text, and how loaded a replica looks. Pure functions."""

from __future__ import annotations

import re
from dataclasses import dataclass

_SAMPLE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})?\s+([0-9.eE+-]+|NaN)\s*$", re.M)


@dataclass(frozen=True)
class EngineLoad:
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0  # 0..1
    prefix_hits: float = 0.0
    prefix_queries: float = 0.0


_WANTED = (
    "vllm:num_requests_waiting",
    "vllm:num_requests_running",
    "vllm:kv_cache_usage_perc",
    "vllm:gpu_cache_usage_perc",
    "vllm:prefix_cache_hits_total",
    "vllm:prefix_cache_queries_total",
)


# vLLM answers /metrics with every family (~58 KB, most of it histogram buckets), but it
# also mounts prometheus_client's own app under /metrics/, which honours `name[]`: there
# the load is ~1 KB, and a scrape costs vLLM's API server 1.7 ms of CPU, not 11
# (benchmarks/RESULTS.md, "The engine scrape"). An engine whose answer there has no
# load (another server, a multiprocess registry) is scraped at /metrics.
FILTERED_PATH = "/metrics/?" + "&".join(f"name%5B%5D={name}" for name in _WANTED)
FULL_PATH = "/metrics"


def has_load(text: bytes) -> bool:
    """Whether a /metrics answer carries the engine's load at all."""
    return b"vllm:num_requests_running" in text


def parse_vllm_metrics(text: str) -> EngineLoad:
    """Sum each gauge over its label sets (one engine may report several). Only the lines
    of the wanted names are looked at (found with str.find): the text is mostly
    histogram buckets, and a regex over all of it cost ~0.9 ms per scrape."""
    totals: dict[str, float] = {}
    text = "\n" + text
    for name in _WANTED:
        needle, at = "\n" + name, 0
        while (at := text.find(needle, at)) != -1:
            end = text.find("\n", at + 1)
            line = text[at + 1 : end if end != -1 else len(text)]
            at += 1
            sample = _SAMPLE.match(line)
            if sample is not None and sample[1] == name and sample[2] != "NaN":
                totals[name] = totals.get(name, 0.0) + float(sample[2])
    return EngineLoad(
        waiting=totals.get("vllm:num_requests_waiting", 0.0),
        running=totals.get("vllm:num_requests_running", 0.0),
        kv_usage=totals.get(
            "vllm:kv_cache_usage_perc", totals.get("vllm:gpu_cache_usage_perc", 0.0)
        ),
        prefix_hits=totals.get("vllm:prefix_cache_hits_total", 0.0),
        prefix_queries=totals.get("vllm:prefix_cache_queries_total", 0.0),
    )


def load_score(in_flight: int, others: float) -> float:
    """Lower is better: the requests this gateway process has on the engine now, plus the
    others it had when last scraped (`others_of`: other workers' and routers'). Live
    counts, not the scraped queue: between two scrapes every request would otherwise go
    to whichever engine looked idlest at the last one (a herd)."""
    return in_flight + others


def others_of(load: EngineLoad, in_flight: int) -> float:
    """At a scrape: the engine's requests that are not this process's own."""
    return max(0.0, load.running + load.waiting - in_flight)


def saturated(
    load: EngineLoad, in_flight: int, max_waiting: float, max_kv_usage: float, max_in_flight: int
) -> bool:
    return (
        load.waiting >= max_waiting or load.kv_usage >= max_kv_usage or in_flight >= max_in_flight
    )
