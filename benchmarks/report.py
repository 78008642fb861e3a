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


def plots(doc: dict) -> dict[str, bytes]:
    """latency.png, throughput.png and goodput.png against the load, as PNG bytes."""
    points = doc["points"]
    xs = [p["load"]["value"] for p in points]
    xlabel = "concurrency" if doc["meta"]["load_kind"] == "concurrency" else "offered req/s"
    top = f"p{max(doc['meta']['percentiles']):g}"
    out: dict[str, bytes] = {}

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax in (("ttft_ms", a), ("tpot_ms", b)):
        ax.plot(xs, _series(points, metric, "p50"), "o-", label="p50")
        ax.plot(xs, _series(points, metric, top), "s--", label=top)
        ax.set(
            xlabel=xlabel, ylabel=metric.replace("_ms", " (ms)").upper(), title=metric[:-3].upper()
        )
        ax.legend()
        ax.grid(alpha=0.3)
    out["latency.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [p["summary"]["output_tok_s"] for p in points], "o-", label="output tok/s")
    ax.set(xlabel=xlabel, ylabel="output tokens/s", title="Throughput")
    ax2 = ax.twinx()
    ax2.plot(xs, [p["summary"]["req_s"] for p in points], "s--", color="tab:orange", label="req/s")
    ax2.set_ylabel("requests/s")
    ax.grid(alpha=0.3)
    fig.legend(loc="upper left")
    out["throughput.png"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.legend(loc="lower left")
    out["goodput.png"] = _png(fig)
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
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
