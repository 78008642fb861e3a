"""An idle gateway's CPU: what its timers and polls cost with no traffic at all.

Starts the gateway (this checkout, and with --before-repo another one, alternating
rounds) in front of a running engine, lets it settle, and reads the CPU time of all
its threads from /proc/PID/task/*/schedstat (nanoseconds, not clock ticks) over a
quiet window. Reports milliseconds of CPU per second, per round and the medians.

    python -m benchmarks.studies.idle_cpu --engine-url http://127.0.0.1:PORT \\
        --model smollm2-135m-instruct --before-repo /tmp/before --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.launch import REPO, exit_on_sigterm, free_port
from benchmarks.studies.gateway_capacity import started


def cpu_ns(pid: int) -> int:
    """Run time of every thread of `pid` so far (schedstat's first field)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended meanwhile
    return total


def idle_ms_per_s(repo: Path, config: Path, settle: float, window: float) -> float:
    port = free_port()
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", str(config)]
    cmd += ["--port", str(port)]
    with started(cmd, "0-1", f"http://127.0.0.1:{port}/ready", cwd=repo) as pid:
        time.sleep(settle)
        before = cpu_ns(pid)
        time.sleep(window)
        return (cpu_ns(pid) - before) / 1e6 / window


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-url", required=True, help="a running vLLM server")
    p.add_argument("--model", required=True, help="the model name it serves")
    p.add_argument("--before-repo", type=Path, help="another checkout (e.g. a git worktree)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settle", type=float, default=5.0, help="seconds after ready")
    p.add_argument("--window", type=float, default=30.0, help="seconds measured")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    config = Path(tempfile.mkdtemp(prefix="idle-cpu-")) / "gateway.yaml"
    engine = {"name": "engine", "model": a.model, "url": a.engine_url}
    config.write_text(yaml.safe_dump({"engines": [engine]}))
    sides = {"tiergate": REPO} | ({"before": a.before_repo} if a.before_repo else {})
    results: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(a.rounds):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))  # ABBA
        for name in order:
            value = idle_ms_per_s(sides[name], config, a.settle, a.window)
            results[name].append(value)
            print(f"round {i + 1} {name}: {value:.2f} ms of CPU per second idle", flush=True)
    for name, values in results.items():
        print(f"{name}: median {statistics.median(values):.2f} ms/s over {len(values)} rounds")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
