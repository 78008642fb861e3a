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


def parse_vllm_metrics(text: str) -> EngineLoad:
    """Sum each gauge over its label sets (one engine may report several)."""
    totals: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        if value != "NaN":
            totals[name] = totals.get(name, 0.0) + float(value)
    return EngineLoad(
        waiting=totals.get("vllm:num_requests_waiting", 0.0),
        running=totals.get("vllm:num_requests_running", 0.0),
        kv_usage=totals.get(
            "vllm:kv_cache_usage_perc", totals.get("vllm:gpu_cache_usage_perc", 0.0)
        ),
        prefix_hits=totals.get("vllm:prefix_cache_hits_total", 0.0),
        prefix_queries=totals.get("vllm:prefix_cache_queries_total", 0.0),
    )


def load_score(load: EngineLoad, in_flight: int) -> float:
    """Lower is better. The gateway's own in-flight count covers the lag between scrapes."""
    busy = max(load.running + load.waiting, float(in_flight))
    return busy + 2.0 * load.waiting + 4.0 * load.kv_usage


def saturated(
    load: EngineLoad, in_flight: int, max_waiting: float, max_kv_usage: float, max_in_flight: int
) -> bool:
    return (
        load.waiting >= max_waiting or load.kv_usage >= max_kv_usage or in_flight >= max_in_flight
    )
