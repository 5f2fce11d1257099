"""Benchmark of GPU processes per tick: 8 GPUs × 8 processes (64 PIDs), NVML to CSV and metrics.

What one recorder tick spends on processes, as thread CPU time (median and mean, µs):

- NVML: the two process calls of each of the 8 GPUs (``NvmlProcessReader.read``: the process
  list and the SM utilization samples) through NVIDIA's real binding over the test suite's fake
  ``libnvidia-ml.so.1``, loaded into this process. The fake re-reads its scenario file on every
  call, which the real driver does not do: this is an upper bound of the binding's share;
- owners + detected jobs: ``ProcessAttribution.records`` (steady state: every PID known) and
  ``DetectedJobs.update`` over a fake ``/proc`` tree of mixed cgroups (Slurm, Kubernetes,
  container, unit, user);
- CSV rows: the 64 rows of ``processes-*.csv`` built as bytes (the write itself is one
  ``os.write``, as for the GPU rows);
- job metrics: the exposition's render with the processes, minus the same render without.

    .venv/bin/python benchmarks/bench_processes.py [--write docs/performance.md] [--quick]

Needs gcc (the fake driver is built on the fly). Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from bench_owners import CGROUPS, cpu_model
from bench_report import write_section

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import fakedriver  # noqa: E402
from fakeproc import add_kthreadd, add_process  # noqa: E402
from gputel.schema import HostReading, Sample  # noqa: E402
from gputel.sources import nvml  # noqa: E402
from gputel.telemetry.csv_sink import CsvSink  # noqa: E402
from gputel.telemetry.exposition import Exposition  # noqa: E402
from gputel.telemetry.jobs import DetectedJobs, ProcessAttribution  # noqa: E402

SECTION = "## GPU processes per tick"
GPUS = 8
PER_GPU = 8
FIRST_PID = 30_000


def fake_tree(root: Path) -> None:
    add_kthreadd(root)
    for i in range(GPUS * PER_GPU):
        add_process(
            root,
            FIRST_PID + i,
            # The Slurm job number changes every 8 PIDs: a job per GPU, as with one rank per GPU.
            cgroup=CGROUPS[i % len(CGROUPS)].format(n=1000 + i // PER_GPU),
            uid=0,
            cmdline=("python", "-m", "torch.distributed.run", "--nproc-per-node=8", "train.py"),
        )


def per_tick_us(work: Callable[[], object], ticks: int) -> tuple[float, float]:
    samples = []
    for _ in range(ticks):
        t0 = time.thread_time_ns()
        work()
        samples.append((time.thread_time_ns() - t0) / 1000)
    return statistics.median(samples), statistics.fmean(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    ap.add_argument("--quick", action="store_true", help="a short run to check the script")
    args = ap.parse_args()
    ticks = 200 if args.quick else 2000
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="gputel-bench-procs-", dir=shm) as tmp:
        work = Path(tmp)
        lib = fakedriver.build(work / "lib")
        driver = fakedriver.FakeDriver(lib, work / "scenario.txt")
        world = fakedriver.scenario(GPUS)
        for g in range(GPUS):
            world[f"gpu.{g}.processes"] = ",".join(
                f"{FIRST_PID + g * PER_GPU + k}:{(1 + k) * 1024 * fakedriver.MIB}:{5 + k}"
                for k in range(PER_GPU)
            )
        driver.write(world)
        fakedriver.preload(lib)
        os.environ[fakedriver.SCENARIO_ENV] = str(driver.path)
        fake_tree(work / "proc")

        source = nvml.open_nvml(None)
        reader = source._processes
        gpus = source._gpus
        readings = source.read()
        assert all(r.processes and len(r.processes) == PER_GPU for r in readings)

        attribution = ProcessAttribution(work / "proc")
        assert attribution.notice is None
        detected = DetectedJobs()
        sample = Sample(datetime.now(timezone.utc), 0.0, readings, HostReading(), [])
        announced: dict[int, tuple[str, ...]] = {g: () for g in range(GPUS)}

        def owners_and_jobs() -> None:
            sample.processes = attribution.records(readings)
            detected.update(sample, announced, ())

        owners_and_jobs()
        assert all(p.job for p in sample.processes), "every fake PID has an owner"
        jobs = len(detected.open())
        sink = CsvSink(work / "log", host="bench")
        exposition = Exposition()
        bare = Sample(sample.timestamp, 0.0, readings, HostReading(), [])

        def render_with() -> None:
            exposition.update(sample)

        def render_without() -> None:
            exposition.update(bare)

        results = {
            "NVML (2 calls × 8 GPUs)": per_tick_us(lambda: [reader.read(g) for g in gpus], ticks),
            "owners + detected jobs": per_tick_us(owners_and_jobs, ticks),
            "processes-*.csv rows": per_tick_us(
                lambda: sink._process_rows(sample, "2026-01-01T00:00:00.000Z"), ticks
            ),
        }
        with_m, with_a = per_tick_us(render_with, ticks)
        without_m, without_a = per_tick_us(render_without, ticks)
        results["job metrics (render delta)"] = (with_m - without_m, with_a - without_a)
        source.close()
    total = sum(m for m, _ in results.values())
    rows = "\n".join(f"| {k} | {m:,.0f} µs | {a:,.0f} µs |" for k, (m, a) in results.items())
    section = f"""{SECTION}

Measured by `benchmarks/bench_processes.py` on {time.strftime("%Y-%m-%d")}: {GPUS} GPUs ×
{PER_GPU} compute processes (64 PIDs, {jobs} jobs), what one recorder tick spends on them, as
thread CPU time, median and mean. NVML is NVIDIA's binding over the suite's fake
`libnvidia-ml.so.1`, which re-reads its scenario file on every call (the real driver answers
from memory): an upper bound of the binding's share. Owners are the steady state (every PID
already known, `docs/attribution.md`); the cold first tick is in "Process owners".

Machine: {cpu_model()}, {os.cpu_count()} logical CPUs; Python {sys.version.split()[0]}.

| part | median | mean |
|---|---:|---:|
{rows}

About {total / 1000:.1f} ms per tick in all for 64 processes, beside the recorder's whole tick
above; without processes on the GPUs the process list is one call per GPU and nothing else.
"""
    print(section)
    if args.write:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
