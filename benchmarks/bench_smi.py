"""Benchmark: what one ``GPUTEL_BACKEND=smi`` read costs (one ``nvidia-smi --query-gpu`` spawn).

Times ``SmiGpuSource.read()`` (the recorder's full read) and ``read_utilization()`` (the agent's
light read) against whichever ``nvidia-smi`` is first on PATH: wall time per read, and CPU per
read of this process plus its children (the nvidia-smi processes, from ``RUSAGE_CHILDREN``),
which is what a node pays once per tick. On a GPU node it measures the real nvidia-smi; with the
test suite's fake (``tests/fakenvml/nvidia-smi`` on PATH and ``FAKE_NVML_SCENARIO`` set) it
measures gputel's side plus a Python process start, not the driver.

    python benchmarks/bench_smi.py [--reads 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from collections.abc import Callable

from gputel.sources.smi import open_smi


def _cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def measure(fn: Callable[[], object], reads: int) -> dict[str, float]:
    walls: list[float] = []
    cpu0 = _cpu_s()
    for _ in range(reads):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (_cpu_s() - cpu0) / reads
    return {
        "wall_ms_median": statistics.median(walls) * 1000,
        "wall_ms_max": max(walls) * 1000,
        "cpu_ms_per_read": cpu * 1000,
        "cpu_pct_of_core_at_1s": cpu * 100,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    exe = shutil.which("nvidia-smi")
    if exe is None:
        print("bench_smi: no nvidia-smi on PATH", file=sys.stderr)
        return 1
    source = open_smi(None)
    source.read()  # warm the page cache for the binary
    result = {
        "nvidia_smi": exe,
        "fake": "FAKE_NVML_SCENARIO" in os.environ,
        "gpus": len(source.devices()),
        "full_read": measure(source.read, args.reads),
        "light_read": measure(source.read_utilization, args.reads),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"nvidia-smi: {exe} ({result['gpus']} GPUs, fake={result['fake']})")
        for name in ("full_read", "light_read"):
            r = result[name]
            assert isinstance(r, dict)
            print(
                f"{name}: wall median {r['wall_ms_median']:.1f} ms (max {r['wall_ms_max']:.1f}), "
                f"CPU {r['cpu_ms_per_read']:.1f} ms per read = {r['cpu_pct_of_core_at_1s']:.2f} % "
                "of a core at 1 s ticks"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
