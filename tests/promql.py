"""PromQL read by a real parser (promql-parser: the Rust parser GreptimeDB uses), so that
a query that would not parse fails here rather than on a Grafana board or in Prometheus."""

from __future__ import annotations

import promql_parser

# Grafana fills these in before Prometheus sees the query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$tier": ".*"}


def metric_names(expr: str) -> set[str]:
    """The metrics a query reads; ValueError naming the fault if it does not parse."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return names
