"""Benchmark: µs of CPU per GPU for one full NVML read, called inline (no reader threads).

Reads every GPU of the test suite's fake libnvidia-ml.so.1 (through NVIDIA's real binding,
loaded into this process) with ``NvmlGpuSource.read_gpu`` in a plain loop, as thread CPU time:
8 GPUs with GPM and 4 compute processes each by default, so the cost is gputel's and the
binding's, not the threads' hand-off (``benchmarks/bench_gpu_readers.py`` measures that). The
fake re-reads its scenario file whenever it changed (here: never) and answers from memory, so
the driver's own share is small; the real driver adds its ioctls.

    .venv/bin/python benchmarks/bench_nvml_read.py [--gpus 8] [--reads 2000] [--processes 4]

Run it with ``PYTHONPATH=<other checkout>/src`` to measure another version of gputel over the
same fake. Needs gcc (the fake driver is built on the fly). Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fakedriver  # noqa: E402
from gputel.sources import nvml  # noqa: E402

#: GPM metric values of a busy GPU (ids of nvmlGpmMetricId_t).
GPM_VALUES = {2: 61.5, 3: 33.2, 5: 40.0, 10: 72.5, 11: 0.5, 12: 12.0, 13: 3.0, 20: 100}
GPM_VALUES |= {21: 250, 60: 1024, 61: 512}


def world(gpus: int, processes: int) -> dict[str, object]:
    values = fakedriver.scenario(gpus)
    for i in range(gpus):
        values.update({f"gpu.{i}.gpm.{k}": v for k, v in GPM_VALUES.items()})
        procs = [
            f"{40_000 + i * 100 + p}:{(p + 1) * 1024 * 1024 * 512}:{10 + p}"
            for p in range(processes)
        ]
        if procs:
            values[f"gpu.{i}.processes"] = ",".join(procs)
        values[f"gpu.{i}.utilization.gpu_pct"] = 90
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--reads", type=int, default=2000, help="full reads of every GPU")
    parser.add_argument("--processes", type=int, default=4, help="compute processes per GPU")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-nvml-read-"))
    lib = fakedriver.build(work / "lib")
    driver = fakedriver.FakeDriver(lib, work / "scenario.txt")
    driver.write(world(args.gpus, args.processes))
    fakedriver.preload(lib)
    os.environ[fakedriver.SCENARIO_ENV] = str(driver.path)
    source = nvml.open_nvml(None)
    indices = [d.index for d in source.devices()]
    for _ in range(3):
        for i in indices:
            source.read_gpu(i)
    sample = source.read_gpu(0)
    assert (
        sample.sm_active_pct == 61.5
        and sample.processes
        and len(sample.processes) == args.processes
    )
    assert sample.power_w is not None and sample.pcie_rx_bytes_per_s is not None, sample
    per_gpu: list[float] = []
    for _ in range(args.rounds):
        t0 = time.thread_time()
        for _ in range(args.reads):
            for i in indices:
                source.read_gpu(i)
        per_gpu.append((time.thread_time() - t0) / (args.reads * len(indices)) * 1e6)
    source.close()
    print(
        f"{args.gpus} GPUs, GPM, {args.processes} processes each, {args.reads} reads x "
        f"{args.rounds} rounds: full read {statistics.median(per_gpu):.1f} µs CPU per GPU "
        f"(median; min {min(per_gpu):.1f}, max {max(per_gpu):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
