"""Benchmark: ``gputel report`` throughput and memory on a generated week of 8-GPU data.

Generates seven daily ``gpu-*.csv`` files (8 GPUs, 1 s ticks: 4,838,400 rows, about 0.8 GB) and a
matching ``host-*.csv`` per day in a scratch directory, then runs ``gputel report --json`` in a
subprocess and reads its wall time, CPU time and peak RSS. Results go to docs/performance.md.

    .venv/bin/python benchmarks/bench_report.py [--days 7] [--gpus 8] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from gputel.schema import GPU_CSV_COLUMNS, HOST_CSV_COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def generate(directory: Path, days: int, gpus: int) -> int:
    """Write the file set; returns the number of GPU rows."""
    start = datetime(2026, 11, 1, tzinfo=timezone.utc)
    rows = 0
    idx = {c: i for i, c in enumerate(GPU_CSV_COLUMNS)}
    for day in range(days):
        t0 = start + timedelta(days=day)
        stamp = t0.strftime("%Y%m%dT%H%M%SZ")
        energy = [0.0] * gpus
        with (
            open(directory / f"gpu-{stamp}-bench.csv", "w", newline="") as g_fh,
            open(directory / f"host-{stamp}-bench.csv", "w", newline="") as h_fh,
        ):
            gw = csv.writer(g_fh)
            hw = csv.writer(h_fh)
            gw.writerow(GPU_CSV_COLUMNS)
            hw.writerow(HOST_CSV_COLUMNS)
            base = [""] * len(GPU_CSV_COLUMNS)
            for s in range(86400):
                ts = (t0 + timedelta(seconds=s)).isoformat(timespec="milliseconds")[:-6] + "Z"
                busy = (s // 600) % 3 != 0
                for g in range(gpus):
                    util = 85.0 + (s + g) % 10 if busy else 0.0
                    power = 70.0 + 6.0 * util
                    row = list(base)
                    row[idx["timestamp"]] = ts
                    row[idx["gpu"]] = str(g)
                    row[idx["uuid"]] = f"GPU-bench-{g}"
                    row[idx["name"]] = "Bench GPU"
                    row[idx["lost"]] = "0"
                    row[idx["utilization_gpu_pct"]] = f"{util:.0f}"
                    row[idx["memory_used_mib"]] = "40000" if busy else "500"
                    row[idx["temperature_c"]] = f"{40 + util / 3:.0f}"
                    row[idx["power_w"]] = f"{power:.1f}"
                    row[idx["energy_j"]] = f"{energy[g]:.1f}"
                    row[idx["clock_event_reasons"]] = "4" if util > 90 else "0"
                    gw.writerow(row)
                    energy[g] += power
                    rows += 1
                hw.writerow([ts, "30.0"] + [""] * (len(HOST_CSV_COLUMNS) - 2))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--days", type=int, default=7)
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--keep", type=Path, help="generate into (or reuse) this directory")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/performance.md")
    args = ap.parse_args()
    directory = args.keep or Path(tempfile.mkdtemp(prefix="gputel-bench-report-"))
    directory.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if not any(directory.glob("gpu-*.csv")):
        rows = generate(directory, args.days, args.gpus)
    else:
        rows = args.days * 86400 * args.gpus
    gen_s = time.perf_counter() - t
    size = sum(f.stat().st_size for f in directory.iterdir())
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "gputel", "report", str(directory), "--json"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss_mib = after.ru_maxrss / 1024
    if not args.keep:
        shutil.rmtree(directory)
    cpu_model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"""## gputel report

Generated {args.days} days × {args.gpus} GPUs at 1 s ({rows:,} GPU rows, {size / 2**20:,.0f} MiB
of CSV, plus one host file per day; generation took {gen_s:.0f} s), then
`gputel report DIR --json` in a subprocess (`benchmarks/bench_report.py`).

| figure | value |
|---|---|
| wall time | {wall:.1f} s |
| CPU time | {cpu:.1f} s |
| throughput | {rows / wall:,.0f} GPU rows/s |
| peak RSS | {rss_mib:.0f} MiB |

Machine: {cpu_model}, {os.cpu_count()} cores, Python {platform.python_version()},
{time.strftime("%Y-%m-%d")}.
"""
    print(text)
    if not args.no_write:
        write_section(ROOT / "docs" / "performance.md", "## gputel report", text)


def write_section(path: Path, heading: str, text: str) -> None:
    """Replace (or append) the section that starts with ``heading`` in ``path``."""
    content = path.read_text() if path.exists() else "# Performance\n"
    if heading in content:
        head, rest = content.split(heading, 1)
        tail = rest.split("\n## ", 1)
        content = head + text.rstrip() + "\n" + ("\n## " + tail[1] if len(tail) > 1 else "")
    else:
        content = content.rstrip() + "\n\n" + text
    path.write_text(content)


if __name__ == "__main__":
    main()
