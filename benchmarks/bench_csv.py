"""Benchmark of the CSV sink alone: CPU per tick to format and write 8 GPU rows and a host row.

In-process, warm caches, one sample per simulated second written to a temporary directory; the
thread CPU time over 200 ticks, best and median of 5 rounds. Run it against two trees to compare
a change to the cell formatting (``PYTHONPATH=other/src``):

    .venv/bin/python benchmarks/bench_csv.py [--gpus 8]

Not a test: the figures depend on the machine. ``bench_record.py`` measures the whole tick.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone

from gputel.schema import HostReading, Sample
from gputel.settings import load_settings
from gputel.sources.select import open_gpu_source
from gputel.telemetry.csv_sink import CsvSink

TICKS = 200
ROUNDS = 5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    args = ap.parse_args()
    settings = load_settings(
        env={}, overrides={"backend": "sim", "sim_gpus": str(args.gpus), "sim_pattern": "37:1000"}
    )
    source, _ = open_gpu_source(settings)
    # Host values as procfs and RAPL give them: fractions that repr writes out in full.
    host = HostReading(
        cpu_util_pct=3.3333333,
        load_1m=0.69287109375,
        load_5m=0.5,
        load_15m=0.25,
        memory_used_mib=12345.678,
        memory_available_mib=1000.5,
        swap_used_mib=0.0,
        disk_read_bytes=123456789,
        disk_write_bytes=1234,
        net_rx_bytes=5,
        net_tx_bytes=6,
        cpu_package_power_w=55.55,
        cpu_package_energy_j=1234.56789,
        cpu_temperature_c=48.0,
    )
    t0 = datetime(2026, 11, 22, tzinfo=timezone.utc)
    samples = [
        Sample(t0 + timedelta(seconds=i), float(i), source.read(), host, []) for i in range(TICKS)
    ]
    per_tick_ms: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gputel-bench-csv-") as directory:
        sink = CsvSink(directory, host="bench")
        for _ in range(ROUNDS):
            start = time.thread_time_ns()
            for sample in samples:
                sink.write(sample)
            per_tick_ms.append((time.thread_time_ns() - start) / TICKS / 1e6)
        sink.close()
    print(
        f"CSV rows per tick, {args.gpus} GPUs + host: best {min(per_tick_ms):.3f} ms, "
        f"median {statistics.median(per_tick_ms):.3f} ms"
    )


if __name__ == "__main__":
    main()
