"""Reports for a bench run: JSON (every request + summary), CSV, PNG plots and one
self-contained HTML page (plots inlined) that a planner can open offline."""

from __future__ import annotations

import base64
import csv
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # no display on servers
import matplotlib.pyplot as plt

from benchmarks.capacity import cost, find_limit, replicas_needed
from benchmarks.metrics import RequestRecord

TEMPLATES = Path(__file__).parent / "templates"


def _ms(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v * 1000, 3)


def request_row(point: int, label: str, r: RequestRecord, window: tuple[float, float]) -> dict:
    return {
        "point": point,
        "load": label,
        "index": r.index,
        "session": r.session,
        "turn": r.turn,
        "scheduled_s": round(r.scheduled, 6),
        "send_lag_ms": _ms(r.send_lag),
        "ttft_ms": _ms(r.ttft),
        "tpot_ms": _ms(r.tpot),
        "e2e_ms": _ms(r.e2e),
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "expected_input": r.expected_input,
        "expected_output": r.expected_output,
        "status": r.status,
        "error_kind": r.error_kind,
        "error": r.error,
        "measured": window[0] <= r.scheduled <= window[1],
    }


def _label(load: dict) -> str:
    v = load["value"]
    return f"C={v:g}" if load["kind"] == "concurrency" else f"{v:g} req/s"


def summary_row(p: dict) -> dict:
    s = p["summary"]
    row = {"load_kind": p["load"]["kind"], "load": p["load"]["value"]}
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        for k, v in s[metric].items():
            if k != "n":
                row[f"{metric[:-3]}_{k}_ms"] = None if v is None else round(v, 3)
    for k in (
        "requests",
        "completed",
        "error_rate",
        "output_tok_s",
        "total_tok_s",
        "req_s",
        "goodput_share",
        "goodput_req_s",
        "mean_input_tokens",
        "mean_output_tokens",
    ):
        row[k] = round(s[k], 4) if isinstance(s[k], float) else s[k]
    row["verdict"] = p["verdict"]["status"]
    row["reasons"] = " | ".join(p["verdict"]["reasons"])
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _series(points: list[dict], metric: str, key: str) -> list[float]:
    return [
        math.nan if p["summary"][metric][key] is None else p["summary"][metric][key] for p in points
    ]


def _legend_below(fig, axes, ncol: int = 4) -> None:
    """One legend for the figure, under the axes: it covers no data, title or label."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(ncol, len(labels)), frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))


def plots(doc: dict) -> dict[str, bytes]:
    """curve.png (throughput against tail latency, the SLO drawn), latency.png,
    throughput.png and goodput.png against the load, as PNG bytes."""
    points = doc["points"]
    xs = [p["load"]["value"] for p in points]
    xlabel = "concurrency" if doc["meta"]["load_kind"] == "concurrency" else "offered req/s"
    top = f"p{max(doc['meta']['percentiles']):g}"
    slo = doc["meta"].get("slo_s") or {}
    labels = [_label(p["load"]) for p in points]
    out: dict[str, bytes] = {}

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    tok_s = [p["summary"]["output_tok_s"] for p in points]
    for ax, metric, limit_key in ((axes[0], "ttft_ms", "ttft"), (axes[1], "tpot_ms", "tpot")):
        lat = _series(points, metric, top)
        ax.plot(lat, tok_s, "o-", label="one point per load")
        for x, y, text in zip(lat, tok_s, labels, strict=True):
            if not math.isnan(x):
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
        if slo.get(limit_key):
            ax.axvline(
                slo[limit_key] * 1000,
                color="tab:red",
                ls="--",
                label=f"SLO ({metric[:-3].upper()})",
            )
        ax.set(
            xlabel=f"{metric[:-3].upper()} {top} (ms)",
            ylabel="output tokens/s",
            title=f"Throughput vs {metric[:-3].upper()} {top}",
        )
        ax.grid(alpha=0.3)
    _legend_below(fig, axes)
    out["curve.png"] = _png(fig, tight=False)

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.4))
    for metric, ax in (("ttft_ms", a), ("tpot_ms", b)):
        ax.plot(xs, _series(points, metric, "p50"), "o-", label=f"{metric[:-3].upper()} p50")
        ax.plot(xs, _series(points, metric, top), "s--", label=f"{metric[:-3].upper()} {top}")
        ax.set(
            xlabel=xlabel, ylabel=metric.replace("_ms", " (ms)").upper(), title=metric[:-3].upper()
        )
        ax.grid(alpha=0.3)
    _legend_below(fig, (a, b))
    out["latency.png"] = _png(fig, tight=False)

    fig, ax = plt.subplots(figsize=(6, 4.4))
    ax.plot(xs, tok_s, "o-", label="output tok/s")
    ax.set(xlabel=xlabel, ylabel="output tokens/s", title="Throughput")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["summary"]["req_s"] for p in points], "s--", color="tab:orange", label="req/s")
    ax2.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    _legend_below(fig, (ax, ax2))
    out["throughput.png"] = _png(fig, tight=False)

    fig, ax = plt.subplots(figsize=(6, 4.4))
    ax.plot(xs, [100 * p["summary"]["goodput_share"] for p in points], "o-", label="% meeting SLO")
    ax.set(
        xlabel=xlabel,
        ylabel="% of requests meeting the SLO",
        ylim=(0, 105),
        title=f"Goodput (SLO: {doc['meta']['slo']})",
    )
    ax2 = ax.twinx()
    ax2.plot(
        xs,
        [p["summary"]["goodput_req_s"] for p in points],
        "s--",
        color="tab:green",
        label="good req/s",
    )
    ax2.set_ylabel("good requests/s")
    ax.grid(alpha=0.3)
    _legend_below(fig, (ax, ax2))
    out["goodput.png"] = _png(fig, tight=False)
    return out


def _png(fig, tight: bool = True) -> bytes:
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_all(doc: dict, out: Path) -> list[Path]:
    """bench.json, requests.csv, summary.csv, three PNGs and report.html under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    rows, summaries = [], []
    for i, p in enumerate(doc["points"]):
        records: list[RequestRecord] = p.pop("records")
        label = _label(p["load"])
        p["requests"] = [
            request_row(i, label, r, tuple(p["window"])) | {"chunk_times": r.chunk_times}
            for r in records
        ]
        rows += [{k: v for k, v in r.items() if k != "chunk_times"} for r in p["requests"]]
        summaries.append(summary_row(p))
    files = {
        "bench.json": json.dumps(doc, indent=1, default=_json_default).encode(),
        "requests.csv": None,
        "summary.csv": None,
        **plots(doc),
    }
    paths = []
    for name, data in files.items():
        path = out / name
        if name == "requests.csv":
            _write_csv(path, rows)
        elif name == "summary.csv":
            _write_csv(path, summaries)
        else:
            path.write_bytes(data)
        paths.append(path)
    html = render_html(doc, summaries, {k: v for k, v in files.items() if k.endswith(".png")})
    (out / "report.html").write_text(html)
    return [*paths, out / "report.html"]


def capacity_answer(doc: dict) -> dict:
    """The highest load meeting the SLO and, when the run was given a traffic profile,
    `plan capacity`'s replicas and dollars: the same functions, on this page."""
    plan = doc["meta"].get("plan") or {}
    target = plan.get("goodput_target", 0.95)
    limit = find_limit(doc["points"], target)
    answer: dict = {"goodput_target": target, "limit": None, "first_fail": None}
    if limit.first_fail is not None:
        answer["first_fail"] = _label(limit.first_fail["load"])
    if limit.last_pass is None:
        return answer
    s = limit.last_pass["summary"]
    answer["limit"] = {
        "load": _label(limit.last_pass["load"]),
        "req_s": s["req_s"],
        "output_tok_s": s["output_tok_s"],
    }
    if plan.get("peak_rps"):
        n = replicas_needed(plan["peak_rps"], limit.per_replica_req_s, plan["headroom"])
        answer["plan"] = {**plan, "replicas": n, "gpus": n * plan["gpus_per_replica"]}
        if plan.get("usd_per_gpu_hour") is not None:
            c = cost(
                plan["usd_per_gpu_hour"],
                plan["gpus_per_replica"],
                n,
                plan["peak_rps"],
                s["mean_output_tokens"],
                limit.per_replica_output_tok_s,
            )
            answer["plan"]["cost"] = asdict(c)
    return answer


def render_html(doc: dict, summaries: list[dict], images: dict[str, bytes]) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
    )
    return env.get_template("report.html.j2").render(
        meta=doc["meta"],
        points=doc["points"],
        summaries=summaries,
        labels=[_label(p["load"]) for p in doc["points"]],
        images={k: base64.b64encode(v).decode() for k, v in images.items()},
        answer=capacity_answer(doc),
    )


def _json_default(o: object):
    if isinstance(o, RequestRecord):
        return asdict(o)
    if isinstance(o, float) and math.isnan(o):
        return None
    raise TypeError(type(o).__name__)


def point_line(label: str, s: dict, verdict: dict) -> str:
    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    line = (
        f"{label}: {s['completed']}/{s['requests']} ok, {s['output_tok_s']:.1f} out tok/s, "
        f"{s['req_s']:.2f} req/s, TTFT p50 {f(s['ttft_ms']['p50'])} ms, "
        f"TPOT p50 {f(s['tpot_ms']['p50'])} ms, goodput {s['goodput_share']:.0%} "
        f"-> {verdict['status'].upper()}"
    )
    return line + "".join(f"\n    - {r}" for r in verdict["reasons"])
