"""`tiergate bench compare RUN_A RUN_B [...]`: runs side by side, per load point and
metric, with the ratio to the first run and a bootstrap confidence interval of the
difference, so that "B is faster" is said only when it is beyond noise.

    tiergate bench compare benchmarks/out/eager benchmarks/out/compiled --out benchmarks/out/cmp

Latency medians (TTFT, TPOT, E2E) are bootstrapped over the run's requests; output
throughput over its time slices (the runner's four equal slices of each window). The
statistics are pure functions; the page is one self-contained HTML file.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import jinja2

LATENCY = {"ttft_ms": "TTFT p50 (ms)", "tpot_ms": "TPOT p50 (ms)", "e2e_ms": "E2E p50 (ms)"}
THROUGHPUT = "output tok/s"


@dataclass(frozen=True)
class Interval:
    diff: float  # statistic(B) - statistic(A)
    lo: float
    hi: float

    @property
    def beyond_noise(self) -> bool:
        return self.lo > 0 or self.hi < 0


def bootstrap_diff(
    a: Sequence[float],
    b: Sequence[float],
    stat: Callable[[Sequence[float]], float] = statistics.median,
    rounds: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval | None:
    """Percentile bootstrap of stat(b) - stat(a), resampling each side on its own."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = random.Random(seed)
    diffs = sorted(
        stat(rng.choices(b, k=len(b))) - stat(rng.choices(a, k=len(a))) for _ in range(rounds)
    )
    tail = (1 - level) / 2
    lo, hi = diffs[int(tail * rounds)], diffs[min(rounds - 1, int((1 - tail) * rounds))]
    return Interval(stat(b) - stat(a), lo, hi)


def load_run(path: Path) -> dict:
    file = path / "bench.json" if path.is_dir() else path
    return json.loads(file.read_text())


def _label(load: dict) -> str:
    v = load["value"]
    return f"C={v:g}" if load["kind"] == "concurrency" else f"{v:g} req/s"


def samples(point: dict, metric: str) -> list[float]:
    """Per-request values inside the measured window, successful requests only."""
    return [
        r[metric]
        for r in point.get("requests", [])
        if r.get("measured") and r.get("error_kind") is None and r.get(metric) is not None
    ]


def compare(runs: list[dict], names: list[str]) -> list[dict]:
    """One row per (load, metric): each run's value, ratio to the first, and the CI."""
    base = {(p["load"]["kind"], p["load"]["value"]): p for p in runs[0]["points"]}
    rows = []
    for key, first in sorted(base.items(), key=lambda kv: kv[0][1]):
        others = [
            next((p for p in r["points"] if (p["load"]["kind"], p["load"]["value"]) == key), None)
            for r in runs[1:]
        ]
        if any(o is None for o in others):
            continue
        points = [first, *others]
        for metric, title in [*LATENCY.items(), ("output_tok_s", THROUGHPUT)]:
            if metric == "output_tok_s":
                values = [p["summary"]["output_tok_s"] for p in points]
                series = [p.get("facts", {}).get("bucket_tok_s") or [] for p in points]
                stat = statistics.mean
            else:
                values = [p["summary"][metric]["p50"] for p in points]
                series = [samples(p, metric) for p in points]
                stat = statistics.median
            row = {"load": _label(first["load"]), "metric": title}
            for name, value in zip(names, values, strict=True):
                row[name] = value
            for name, value, s in zip(names[1:], values[1:], series[1:], strict=True):
                ci = bootstrap_diff(series[0], s, stat)
                row[f"{name} / {names[0]}"] = value / values[0] if values[0] and value else None
                row[f"{name} CI"] = asdict(ci) if ci else None
                row[f"{name} beyond noise"] = bool(ci and ci.beyond_noise)
            rows.append(row)
    return rows


def verdict(rows: list[dict], names: list[str]) -> list[str]:
    lines = []
    for name in names[1:]:
        moved = [r for r in rows if r.get(f"{name} beyond noise")]
        if not moved:
            lines.append(f"{name} does not differ from {names[0]} beyond noise (95 % CIs).")
            continue
        parts = []
        for r in moved:
            ci, ratio = r[f"{name} CI"], r[f"{name} / {names[0]}"]
            parts.append(
                f"{r['metric']} at {r['load']}: x{ratio:.3f} "
                f"(difference {ci['diff']:+.1f}, 95 % CI {ci['lo']:+.1f} .. {ci['hi']:+.1f})"
            )
        lines.append(f"{name} differs from {names[0]} beyond noise in " + "; ".join(parts) + ".")
    return lines


def plot(runs: list[dict], names: list[str]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    for run, name in zip(runs, names, strict=True):
        pts = sorted(run["points"], key=lambda p: p["load"]["value"])
        xs = [p["load"]["value"] for p in pts]
        a.plot(xs, [p["summary"]["ttft_ms"]["p50"] for p in pts], "o-", label=name)
        b.plot(xs, [p["summary"]["output_tok_s"] for p in pts], "o-", label=name)
    kind = runs[0]["meta"]["load_kind"]
    xlabel = "concurrency" if kind == "concurrency" else "offered req/s"
    a.set(xlabel=xlabel, ylabel="TTFT p50 (ms)", title="Latency")
    b.set(xlabel=xlabel, ylabel="output tokens/s", title="Throughput")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    handles, labels = a.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend sits below the axes, over nothing
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def markdown(rows: list[dict], names: list[str]) -> str:
    head = ["load", "metric", *names]
    for name in names[1:]:
        head += [f"{name} / {names[0]}", f"95 % CI of {name} - {names[0]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["load"], r["metric"], *(f"{r[n]:,.1f}" for n in names)]
        for name in names[1:]:
            ratio, ci = r[f"{name} / {names[0]}"], r[f"{name} CI"]
            cells.append("-" if ratio is None else f"{ratio:.3f}")
            mark = " **beyond noise**" if r[f"{name} beyond noise"] else ""
            cells.append("-" if ci is None else f"{ci['lo']:+.1f} .. {ci['hi']:+.1f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tiergate bench compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="bench output folders (or bench.json)")
    p.add_argument("--names", nargs="+", help="one per run (default: the folder names)")
    p.add_argument("--out", type=Path, required=True, help="folder for compare.html/.csv")
    a = p.parse_args(argv)
    if len(a.runs) < 2:
        p.error("compare needs at least two runs")
    names = a.names or [r.name if r.is_dir() else r.parent.name for r in a.runs]
    if len(names) != len(a.runs) or len(set(names)) != len(names):
        p.error("--names: one distinct name per run")
    runs = [load_run(r) for r in a.runs]
    kinds = {r["meta"]["load_kind"] for r in runs}
    if len(kinds) > 1:
        p.error(f"the runs sweep different kinds of load: {sorted(kinds)}")
    rows = compare(runs, names)
    if not rows:
        p.error("the runs share no load point")
    lines = verdict(rows, names)
    table = markdown(rows, names)
    print(table)
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    with (a.out / "compare.csv").open("w", newline="") as f:
        flat = [
            {k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()} for r in rows
        ]
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    html = env.get_template("compare.html.j2").render(
        names=names,
        runs=[r["meta"] for r in runs],
        rows=rows,
        verdict=lines,
        image=base64.b64encode(plot(runs, names)).decode(),
    )
    (a.out / "compare.html").write_text(html)
    print(f"page: {a.out / 'compare.html'}")
    return 0
