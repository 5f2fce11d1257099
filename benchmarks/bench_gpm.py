"""Benchmark: the CPU of GPM reads per GPU per tick, over the fake libnvidia-ml.so.1.

Reads 8 GPUs of the test suite's fake driver through NVIDIA's real binding (loaded into this
process) and prints, per GPU per read:

- the GPM part of a full read alone (one ``nvmlGpmSampleGet`` + one ``nvmlGpmMetricsGet`` of the
  eleven metrics, and the ctypes work around them) - the recorder's cost per GPU per tick;
- the GPM part of the agent's light read (SM activity only) - the agent's extra cost per GPU per
  tick under ``GPUTEL_ACTIVITY=sm``;
- a whole full read with GPM and without it (PCIe from ``nvmlDeviceGetPcieThroughput``; the fake
  answers at once, where a real driver blocks about 20 ms per call).

The fake's calls cost next to nothing, so these are gputel's and the binding's own CPU; a real
driver adds its work inside the calls. Needs gcc (the fake is built on the fly).

    python benchmarks/bench_gpm.py [--reads 2000] [--gpus 8]
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
from gputel.schema import GpuReading  # noqa: E402
from gputel.sources import nvml  # noqa: E402

#: Every metric gputel asks for, with a value (metric id -> value).
GPM_VALUES = {2: 61.5, 3: 33.2, 5: 40.0, 10: 72.5, 11: 0.5, 12: 12.0, 13: 3.0, 20: 100.0,
              21: 250.0, 60: 1024.0, 61: 512.0}  # fmt: skip


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(fn: Callable[[], object], reads: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per call, best of three runs."""
    best_wall = best_cpu = float("inf")
    fn()
    for _ in range(3):
        c0, t0 = _cpu(), time.perf_counter()
        for _ in range(reads):
            fn()
        best_wall = min(best_wall, (time.perf_counter() - t0) / reads * 1e6)
        best_cpu = min(best_cpu, (_cpu() - c0) / reads * 1e6)
    return best_wall, best_cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reads", type=int, default=2000)
    parser.add_argument("--gpus", type=int, default=8)
    args = parser.parse_args()
    n = args.gpus
    work = Path(tempfile.mkdtemp(prefix="bench-gpm-"))
    lib = fakedriver.build(work / "lib")
    driver = fakedriver.FakeDriver(lib, work / "scenario.txt")
    world = fakedriver.scenario(n)
    for i in range(n):
        world.update({f"gpu.{i}.gpm.{k}": v for k, v in GPM_VALUES.items()})
    driver.write(world)
    fakedriver.preload(lib)
    os.environ[fakedriver.SCENARIO_ENV] = str(driver.path)

    source = nvml.open_nvml(None)
    gpus = source._gpus  # the per-GPU records: the GPM reader works on them

    def gpm_full() -> None:
        for g in gpus:
            with g.lock:
                source.gpm.fill(g, GpuReading(g.index, g.uuid, g.name))

    def gpm_light() -> None:
        for g in gpus:
            with g.lock:
                source.gpm.fill_light(g, GpuReading(g.index, g.uuid, g.name))

    rows = [
        ("GPM, full (11 metrics)", measure(gpm_full, args.reads // 4)),
        ("GPM, light (SM activity)", measure(gpm_light, args.reads // 4)),
        ("full read with GPM", measure(source.read, args.reads // 8)),
    ]
    sample = source.read()[0]
    assert sample.sm_active_pct == 61.5 and sample.pcie_rx_bytes_per_s is not None, sample
    source.close()

    world.update({f"gpu.{i}.gpm.supported": 0 for i in range(n)})
    driver.write(world)
    nvml.reset_nvml_state()
    plain = nvml.open_nvml(None)
    rows.append(("full read without GPM", measure(plain.read, args.reads // 8)))
    assert plain.read()[0].sm_active_pct is None
    plain.close()

    print(f"{n} GPUs, fake driver; per GPU per read:")
    for name, (wall, cpu) in rows:
        print(f"  {name:26s} {wall / n:7.1f} µs wall  {cpu / n:7.1f} µs CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
