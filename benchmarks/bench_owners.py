"""Benchmark of process-owner lookups: CPU per tick for 8 GPUs × 8 processes (64 PIDs).

Two proc roots: a fake tree on tmpfs (the test suite's layout, with Slurm, Kubernetes,
container, unit and user cgroups mixed) and the real ``/proc`` with 64 live ``sleep``
processes started by this script. For each, the thread CPU time (CLOCK_THREAD_CPUTIME_ID, ns)
of one ``OwnerResolver.resolve`` call over the 64 PIDs:

- cold: a fresh resolver every tick, so every PID's files are read (a recorder's first tick);
- steady: the same resolver tick after tick with the same PIDs (what the cache gives);
- start-time check: reading every PID's ``stat`` once per tick, the cost a cache that
  re-checked identity on every tick would pay (for comparison; the resolver does not).

    .venv/bin/python benchmarks/bench_owners.py [--write docs/performance.md] [--quick]

Not a test: the figures depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_report import write_section
from gputel.sources.owners import OwnerResolver, read_start_ticks

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from fakeproc import add_process  # noqa: E402

SECTION = "## Process owners"
GPUS = 8
PER_GPU = 8
POD = "1d4a5b6c_7e8f_4a0b_9c1d_2e3f4a5b6c7d"
CONTAINER = "9ec39b91f3d70e1beff50a308f77067065ea6be0d91a3378375056cd4422cf3d"
CGROUPS = [
    "0::/system.slice/slurmstepd.scope/job_{n}/step_0/user/task_0",
    f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD}.slice/"
    f"cri-containerd-{CONTAINER}.scope",
    f"0::/system.slice/docker-{CONTAINER}.scope",
    "0::/system.slice/vllm.service",
    "0::/user.slice/user-1000.slice/session-3.scope",
]


def fake_tree(root: Path) -> list[int]:
    pids = []
    for i in range(GPUS * PER_GPU):
        pid = 20_000 + i
        add_process(
            root,
            pid,
            cgroup=CGROUPS[i % len(CGROUPS)].format(n=1000 + i),
            uid=(0, 65534)[i % 2],
            cmdline=("python", "-m", "torch.distributed.run", "--nproc-per-node=8", "train.py"),
            start_ticks=5_000_000 + i,
        )
        pids.append(pid)
    return pids


def per_tick_us(work: Callable[[], object], ticks: int) -> tuple[float, float]:
    """(median, mean) thread CPU of ``work`` in µs over ``ticks`` calls."""
    samples = []
    for _ in range(ticks):
        t0 = time.thread_time_ns()
        work()
        samples.append((time.thread_time_ns() - t0) / 1000)
    return statistics.median(samples), statistics.fmean(samples)


def measure(proc_root: Path, pids: list[int], quick: bool) -> dict[str, tuple[float, float]]:
    cold_ticks, steady_ticks = (50, 500) if quick else (300, 5000)
    steady = OwnerResolver(proc_root)
    owners = steady.resolve(pids)
    missing = [pid for pid, owner in owners.items() if owner is None]
    if missing:
        raise SystemExit(f"no owner for {len(missing)} PIDs under {proc_root}")
    return {
        "cold": per_tick_us(lambda: OwnerResolver(proc_root).resolve(pids), cold_ticks),
        "steady": per_tick_us(lambda: steady.resolve(pids), steady_ticks),
        "start-time check": per_tick_us(
            lambda: [read_start_ticks(proc_root, pid) for pid in pids], cold_ticks
        ),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    ap.add_argument("--quick", action="store_true", help="a short run to check the script")
    args = ap.parse_args()
    results: dict[str, dict[str, tuple[float, float]]] = {}
    shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="gputel-bench-owners-", dir=shm) as tmp:
        pids = fake_tree(Path(tmp))
        results["fake tree on tmpfs"] = measure(Path(tmp), pids, args.quick)
    sleepers = [
        subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL) for _ in range(GPUS * PER_GPU)
    ]
    try:
        results["real /proc (64 sleep processes)"] = measure(
            Path("/proc"), [p.pid for p in sleepers], args.quick
        )
    finally:
        for p in sleepers:
            p.kill()
            p.wait()
    rows = "\n".join(
        f"| {root} | {r['cold'][0]:,.0f} µs ({r['cold'][1]:,.0f}) "
        f"| {r['steady'][0]:,.1f} µs ({r['steady'][1]:,.1f}) "
        f"| {r['start-time check'][0]:,.0f} µs ({r['start-time check'][1]:,.0f}) |"
        for root, r in results.items()
    )
    real = results["real /proc (64 sleep processes)"]
    check_ms = real["start-time check"][0] / 1000
    cold_ms = real["cold"][0] / 1000
    per_pid = real["cold"][0] / (GPUS * PER_GPU)
    section = f"""{SECTION}

Measured by `benchmarks/bench_owners.py` on {time.strftime("%Y-%m-%d")}: the owners of the
processes of {GPUS} GPUs × {PER_GPU} (64 PIDs) per tick, as thread CPU time of one
`OwnerResolver.resolve` call, median (mean). Cold: a fresh resolver, every PID's `stat`,
`cgroup`, `status` and `cmdline` read and the user names looked up. Steady: the same PIDs
tick after tick. Start-time check: reading every PID's `stat` once, what a cache that
re-checked each PID's identity on every tick would pay; the resolver re-checks only a PID that
comes back after an absence, so it does not.

Machine: {cpu_model()}, {os.cpu_count()} logical CPUs, {platform.machine()};
Linux {platform.release()}; Python {platform.python_version()}.

| proc root | cold tick | steady tick | start-time check |
|---|---:|---:|---:|
{rows}

The steady state is the dictionary look-ups of the 64 PIDs. Checking every PID's start time on
every tick would cost about {check_ms:.1f} ms per tick on the real `/proc`, a large share of the
recorder's whole tick (section above), to guard against a PID reuse that would need the kernel
to hand out every other PID within one tick while NVML keeps reporting it; so the resolver
trusts a continuously reported PID. A cold tick (about {cold_ms:.1f} ms on the real `/proc`,
about {per_pid:.0f} µs per new PID) is paid once per recording session and when processes
start.
"""
    print(section)
    if args.write:
        write_section(args.write, SECTION, section)


if __name__ == "__main__":
    main()
