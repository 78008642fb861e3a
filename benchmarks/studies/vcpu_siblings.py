"""Which CPUs slow each other (hyperthreads, or a VM's vCPUs on shared cores): a busy loop
on cpu 0 alone, then beside one on each other cpu, then on every cpu at once. Read it
before a scaling run: a worker count that fills slowed CPUs measures the host, not us.

    python -m benchmarks.studies.vcpu_siblings --out benchmarks/out/vcpu_siblings.json

Prints cpu 0's speed beside each other cpu (1.0: unaffected), and cpu 0's and the
median cpu's speed with all busy, as shares of cpu 0's speed alone.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path


def _spin(cpu: int, seconds: float, results: mp.Queue) -> None:
    os.sched_setaffinity(0, {cpu})
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    results.put((cpu, n))


def spin_together(cpus: list[int], seconds: float = 0.8) -> dict[int, int]:
    """Loop iterations each cpu managed while all of `cpus` spun at once."""
    results: mp.Queue = mp.Queue()
    procs = [mp.Process(target=_spin, args=(c, seconds, results)) for c in cpus]
    for proc in procs:
        proc.start()
    counts = dict(results.get() for _ in procs)
    for proc in procs:
        proc.join()
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    n = os.cpu_count() or 1
    alone = spin_together([0])[0]
    report: dict[str, float] = {"alone": alone}
    for k in range(1, n):
        report[str(k)] = spin_together([0, k])[0] / alone
    busy = spin_together(list(range(n)))
    report["all_busy_cpu0"] = busy[0] / alone
    report["all_busy_median"] = statistics.median(busy.values()) / alone
    print(json.dumps(report))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
