"""Writes the Grafana dashboard the chart ships (k8s/tiergate/dashboards/tiergate.json).

    python k8s/dashboard.py          # rewrite the JSON after changing the panels here

Panels per tier and per replica from tiergate's /metrics, and per engine pod from
vLLM's own. tests/test_chart.py checks that the file matches this script, and a
real-engine test checks that every metric queried exists in a real run's /metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "tiergate" / "dashboards" / "tiergate.json"
W = "[$__rate_interval]"


def _quantiles(metric: str, by: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{W})))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.99)
    ]


# (title, unit, [(PromQL, legend)])
GATEWAY = [
    (
        "Requests/s by tier and status",
        "reqps",
        [
            (
                'sum by (tier, status) (rate(tiergate_tier_requests_total{tier=~"$tier"}'
                + W
                + "))",
                "{{tier}} {{status}}",
            )
        ],
    ),
    (
        "Errors/s by tier (non-2xx)",
        "reqps",
        [
            (
                "sum by (tier, status) (rate(tiergate_tier_requests_total"
                '{tier=~"$tier", status!~"2.."}' + W + "))",
                "{{tier}} {{status}}",
            )
        ],
    ),
    ("TTFT through the gateway", "s", _quantiles("tiergate_time_to_first_token_seconds", "model")),
    (
        "E2E latency through the gateway",
        "s",
        _quantiles("tiergate_e2e_request_latency_seconds", "model"),
    ),
    (
        "Output tokens/s by model",
        "short",
        [("sum by (model) (rate(tiergate_completion_tokens_total" + W + "))", "{{model}}")],
    ),
    (
        "429s: gateway admission and full tiers",
        "reqps",
        [
            (
                "sum by (reason) (rate(tiergate_admission_refused_total" + W + "))",
                "gateway {{reason}}",
            ),
            (
                'sum by (tier) (rate(tiergate_tier_requests_total{status="429"}' + W + "))",
                "tier {{tier}}",
            ),
        ],
    ),
    (
        "Spills and fallbacks",
        "reqps",
        [
            (
                "sum by (from_tier, to_tier) (rate(tiergate_spills_total" + W + "))",
                "spill {{from_tier}} -> {{to_tier}}",
            ),
            (
                "sum by (from_tier, to_tier) (rate(tiergate_fallbacks_total" + W + "))",
                "fallback {{from_tier}} -> {{to_tier}}",
            ),
        ],
    ),
    (
        "Retries and upstream failures by replica",
        "reqps",
        [
            (
                "sum by (replica, reason) (rate(tiergate_retries_total" + W + "))",
                "retry {{replica}} {{reason}}",
            ),
            (
                "sum by (replica, code) (rate(tiergate_upstream_failures_total" + W + "))",
                "failure {{replica}} {{code}}",
            ),
        ],
    ),
    (
        "Breaker state by replica (0 closed, 1 half-open, 2 open)",
        "short",
        [("max by (replica) (tiergate_circuit_state)", "{{replica}}")],
    ),
    ("Replicas ready", "short", [("sum by (engine) (tiergate_engine_ready)", "{{engine}}")]),
    (
        "Estimated cost per hour by tier",
        "currencyUSD",
        [("sum by (tier) (rate(tiergate_estimated_cost_total" + W + ")) * 3600", "{{tier}}")],
    ),
    (
        "Gateway load",
        "short",
        [
            ("sum by (engine) (tiergate_requests_in_flight)", "in flight {{engine}}"),
            ("max(tiergate_event_loop_lag_milliseconds)", "event-loop lag ms"),
        ],
    ),
]

ENGINES = [
    (
        "Queue depth per engine pod",
        "short",
        [
            ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}"),
            ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
        ],
    ),
    (
        "KV-cache usage per engine pod",
        "percentunit",
        [("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")],
    ),
    (
        "Prefix-cache hit rate per engine pod",
        "percentunit",
        [
            (
                "sum by (instance) (rate(vllm:prefix_cache_hits_total" + W + ")) / "
                "sum by (instance) (rate(vllm:prefix_cache_queries_total" + W + "))",
                "{{instance}}",
            )
        ],
    ),
    (
        "Inter-token latency per engine pod",
        "s",
        _quantiles("vllm:inter_token_latency_seconds", "instance"),
    ),
    ("TTFT inside the engine", "s", _quantiles("vllm:time_to_first_token_seconds", "instance")),
    (
        "Output tokens/s per engine pod",
        "short",
        [("sum by (instance) (rate(vllm:generation_tokens_total" + W + "))", "{{instance}}")],
    ),
]

ROUTING_AND_TENANTS = [
    (
        "Prefix reuse: matched share of prompt tokens by tier",
        "percentunit",
        [
            (
                "sum by (tier) (rate(tiergate_prefix_matched_tokens_total" + W + ")) / "
                "sum by (tier) (rate(tiergate_prefix_prompt_tokens_total" + W + "))",
                "{{tier}}",
            )
        ],
    ),
    (
        "Prefix index blocks per replica",
        "short",
        [("max by (engine, source) (tiergate_prefix_index_blocks)", "{{engine}} {{source}}")],
    ),
    (
        "KV-event batches/s per engine",
        "short",
        [
            (
                "sum by (engine, outcome) (rate(tiergate_kv_events_total" + W + "))",
                "{{engine}} {{outcome}}",
            )
        ],
    ),
    (
        "Seconds since each engine's last KV event",
        "s",
        [("time() - max by (engine) (tiergate_kv_events_last_timestamp_seconds)", "{{engine}}")],
    ),
    (
        "Requests/s and refusals/s by tenant",
        "reqps",
        [
            ("sum by (tenant) (rate(tiergate_tenant_requests_total" + W + "))", "{{tenant}}"),
            (
                "sum by (tenant, reason) (rate(tiergate_tenant_refused_total" + W + "))",
                "refused {{tenant}} {{reason}}",
            ),
        ],
    ),
    (
        "Tokens/s by tenant",
        "short",
        [
            (
                "sum by (tenant, kind) (rate(tiergate_tenant_tokens_total" + W + "))",
                "{{tenant}} {{kind}}",
            )
        ],
    ),
    (
        "Estimated cost per hour by tenant",
        "currencyUSD",
        [
            (
                "sum by (tenant) (rate(tiergate_tenant_estimated_cost_total" + W + ")) * 3600",
                "{{tenant}}",
            )
        ],
    ),
    (
        "Key store (PostgreSQL): contact age and usage rows",
        "short",
        [
            ("max(tiergate_tenancy_store_contact_age_seconds)", "seconds since it answered"),
            ("sum(tiergate_tenancy_usage_rows_buffered)", "rows buffered"),
            ("sum(tiergate_tenancy_usage_rows_dropped)", "rows dropped"),
            ("min(tiergate_tenancy_store_connected)", "connected"),
        ],
    ),
]


def _panel(pid: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict:
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": [
            {"refId": chr(65 + i), "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(targets)
        ],
    }


def build() -> dict:
    panels, pid, y = [], 1, 0
    rows = (
        ("Gateway (tiergate)", GATEWAY),
        ("Engines (vLLM, per pod)", ENGINES),
        ("Prefix routing and tenants", ROUTING_AND_TENANTS),
    )
    for row, items in rows:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        pid, y = pid + 1, y + 1
        for i, (title, unit, targets) in enumerate(items):
            panels.append(_panel(pid, title, unit, targets, 12 * (i % 2), y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(items) + 1) // 2)
    return {
        "uid": "tiergate",
        "title": "tiergate",
        "tags": ["tiergate", "vllm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus"},
                {
                    "name": "tier",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(tiergate_tier_requests_total, tier)",
                    "includeAll": True,
                    "multi": True,
                    "current": {"text": "All", "value": "$__all"},
                },
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=1) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
