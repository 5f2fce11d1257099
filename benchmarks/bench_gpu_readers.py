"""Benchmark: what the recorder's per-GPU reader threads cost over reading GPUs in one loop.

Reads 8 GPUs of the test suite's fake libnvidia-ml.so.1 (through NVIDIA's real binding, loaded
into this process) directly and through ``DeadlineGpuSource``, alternating, and prints wall and
CPU time per full read. The fake's calls are cheap, so the difference is the threads' hand-off,
which is what the deadline costs on a healthy node. Needs gcc (the fake is built on the fly).

    python benchmarks/bench_gpu_readers.py [--reads 300] [--gpus 8]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import fakedriver  # noqa: E402
from gputel.sources import nvml  # noqa: E402
from gputel.telemetry.gpu_deadline import DeadlineGpuSource  # noqa: E402


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], object], reads: int) -> tuple[float, float]:
    fn()
    c0, t0 = _cpu(), time.perf_counter()
    for _ in range(reads):
        fn()
    return (time.perf_counter() - t0) / reads * 1000, (_cpu() - c0) / reads * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-readers-"))
    lib = fakedriver.build(work / "lib")
    driver = fakedriver.FakeDriver(lib, work / "scenario.txt")
    driver.write(fakedriver.scenario(args.gpus))
    fakedriver.preload(lib)
    os.environ[fakedriver.SCENARIO_ENV] = str(driver.path)
    source = nvml.open_nvml(None)
    readers = DeadlineGpuSource(source, deadline_s=0.5)
    results: dict[str, list[tuple[float, float]]] = {"one loop": [], "per-GPU readers": []}
    for _ in range(3):
        results["one loop"].append(measure(source.read, args.reads))
        results["per-GPU readers"].append(measure(readers.read, args.reads))
    for name, runs in results.items():
        wall = min(w for w, _ in runs)
        cpu = min(c for _, c in runs)
        print(f"{name}: {wall:.2f} ms wall, {cpu:.2f} ms CPU per read of {args.gpus} GPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
