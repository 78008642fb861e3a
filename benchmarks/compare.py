"""`tiergate bench compare RUN_A RUN_B [...]`: runs side by side, per load point and
metric, with the ratio to the first run and a bootstrap confidence interval of the
difference, so that "B is faster" is said only when it is beyond noise.

    tiergate bench compare benchmarks/out/eager benchmarks/out/compiled --out benchmarks/out/cmp

Latency medians (TTFT, TPOT, E2E) are bootstrapped over the run's requests; output
throughput over its time slices (the runner's four equal slices of each window). A name
given to several runs makes them repeats of one configuration: the bootstrap then draws
runs as well as requests (a cluster bootstrap), so drift between sittings widens the
interval instead of hiding in it, and the value shown is the median over the repeats.

    tiergate bench compare eager-1 compiled-1 compiled-2 eager-2 \
        --names eager compiled compiled eager --out benchmarks/out/cmp

The statistics are pure functions; the page is one self-contained HTML file.
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
    return bootstrap_runs_diff([a], [b], stat, rounds, level, seed)


def bootstrap_runs_diff(
    a_runs: Sequence[Sequence[float]],
    b_runs: Sequence[Sequence[float]],
    stat: Callable[[Sequence[float]], float] = statistics.median,
    rounds: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval | None:
    """stat(b) - stat(a) over each side's pooled samples, with a two-stage percentile
    bootstrap: draw runs with replacement, then samples within each drawn run. One run
    per side is the plain bootstrap; with repeats, run-to-run drift is in the interval."""
    a_runs, b_runs = [r for r in a_runs if r], [r for r in b_runs if r]
    if sum(map(len, a_runs)) < 2 or sum(map(len, b_runs)) < 2:
        return None
    rng = random.Random(seed)

    def draw(runs: Sequence[Sequence[float]]) -> float:
        pooled: list[float] = []
        for run in rng.choices(runs, k=len(runs)):
            pooled += rng.choices(run, k=len(run))
        return stat(pooled)

    diffs = sorted(draw(b_runs) - draw(a_runs) for _ in range(rounds))
    tail = (1 - level) / 2
    lo, hi = diffs[int(tail * rounds)], diffs[min(rounds - 1, int((1 - tail) * rounds))]
    pooled_a = [x for r in a_runs for x in r]
    pooled_b = [x for r in b_runs for x in r]
    return Interval(stat(pooled_b) - stat(pooled_a), lo, hi)


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


def _value(point: dict, metric: str) -> float:
    """The run's own figure: output tok/s, or a latency's p50."""
    summary = point["summary"]
    return summary[metric] if metric == "output_tok_s" else summary[metric]["p50"]


def _series(point: dict, metric: str) -> list[float]:
    """What the bootstrap draws: throughput per time slice, or per-request latencies."""
    if metric == "output_tok_s":
        return point.get("facts", {}).get("bucket_tok_s") or []
    return samples(point, metric)


def group(runs: list[dict], names: list[str]) -> dict[str, list[dict]]:
    """Runs by configuration name, in the order the names first appear (the first is
    the baseline); a repeated name is a repeat of that configuration."""
    groups: dict[str, list[dict]] = {}
    for run, name in zip(runs, names, strict=True):
        groups.setdefault(name, []).append(run)
    return groups


def compare(runs: list[dict], names: list[str]) -> list[dict]:
    """One row per (load, metric): each configuration's value (the median over its
    repeats), the ratio to the first, and the CI of the difference."""
    groups = group(runs, names)
    configs = list(groups)
    base = groups[configs[0]][0]

    def key(p: dict) -> tuple[str, float]:
        return p["load"]["kind"], p["load"]["value"]

    rows = []
    for first in sorted(base["points"], key=lambda p: p["load"]["value"]):
        points = {
            name: [next((p for p in r["points"] if key(p) == key(first)), None) for r in group_]
            for name, group_ in groups.items()
        }
        if any(p is None for ps in points.values() for p in ps):
            continue
        for metric, title in [*LATENCY.items(), ("output_tok_s", THROUGHPUT)]:
            stat = statistics.mean if metric == "output_tok_s" else statistics.median
            row: dict = {"load": _label(first["load"]), "metric": title}
            for name, ps in points.items():
                row[name] = statistics.median(_value(p, metric) for p in ps)
                if len(ps) > 1:
                    row[f"{name} runs"] = [_value(p, metric) for p in ps]
            base_series = [_series(p, metric) for p in points[configs[0]]]
            for name in configs[1:]:
                runs_ = [_series(p, metric) for p in points[name]]
                ci = bootstrap_runs_diff(base_series, runs_, stat)
                v0, v = row[configs[0]], row[name]
                row[f"{name} / {configs[0]}"] = v / v0 if v0 and v else None
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


def run_labels(names: list[str]) -> list[str]:
    """A name per run for the plot: repeats numbered (eager #1, eager #2)."""
    count = {n: names.count(n) for n in names}
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(f"{n} #{seen[n]}" if count[n] > 1 else n)
    return out


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
    if len(names) != len(a.runs):
        p.error("--names: one name per run (a repeated name marks repeats of one configuration)")
    configs = list(dict.fromkeys(names))
    if not a.names and len(configs) < len(names):
        p.error("two runs' folders share a name: give --names (one per run)")
    if len(configs) < 2:
        p.error("--names: at least two configurations")
    runs = [load_run(r) for r in a.runs]
    kinds = {r["meta"]["load_kind"] for r in runs}
    if len(kinds) > 1:
        p.error(f"the runs sweep different kinds of load: {sorted(kinds)}")
    rows = compare(runs, names)
    if not rows:
        p.error("the runs share no load point")
    lines = verdict(rows, configs)
    table = markdown(rows, configs)
    print(table)
    print("\n".join(lines))
    a.out.mkdir(parents=True, exist_ok=True)
    with (a.out / "compare.csv").open("w", newline="") as f:
        flat = [
            {k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in r.items()}
            for r in rows
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
        names=configs,
        run_names=names,
        runs=[r["meta"] for r in runs],
        rows=rows,
        verdict=lines,
        image=base64.b64encode(plot(runs, run_labels(names))).decode(),
    )
    (a.out / "compare.html").write_text(html)
    print(f"page: {a.out / 'compare.html'}")
    return 0
