"""Benchmark of ``gputel record``: CPU per tick, RSS, and CPU/latency per /metrics scrape.

Runs the real command as a subprocess on simulated GPUs (1, 8, 64) with the real host sources
(procfs, RAPL and hwmon under /sys), and compares scrapes with Prometheus's node_exporter started
on a loopback port in the same run. Tick CPU comes from /proc/PID/task/*/schedstat (ns), scrape
CPU from /proc/PID/stat (utime + stime, which keeps the time of finished request threads), RSS
from /proc/PID/status. The run directory sits on tmpfs (/dev/shm), as /run/gputel does in
production; the CSV files go to a directory on the root filesystem, as /var/log/gputel does.

    .venv/bin/python benchmarks/bench_record.py [--write docs/performance.md] [--quick]

Not a test: the figures depend on the machine. Targets (issue 3): <= 2 ms CPU per tick with
8 GPUs plus host sources; RSS <= 45 MiB; CPU per scrape <= 0.25x node_exporter's.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
NODE_EXPORTER = "/usr/bin/prometheus-node-exporter"
SECTION = "## gputel record"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def run_ms(pid: int) -> float:
    """On-CPU time of the live threads in ns precision (schedstat), for the tick loop."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(m.group(1)) / 1024 if m else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ticks(run_dir: Path) -> int:
    try:
        text = (run_dir / "recorder.json").read_text()
    except OSError:
        return 0
    m = re.search(r'"tick": ?(\d+)', text)
    return int(m.group(1)) if m else 0


def at_publication(run_dir: Path, pid: int, timeout: float = 20.0) -> tuple[int, float]:
    """(tick, CPU ms) read just after the recorder publishes ``recorder.json``: at sub-second
    intervals it publishes about once a second, so its ``tick`` only matches the CPU spent
    when both are read right after a publication (then the next tick is an interval away)."""
    before = ticks(run_dir)
    end = time.monotonic() + timeout
    while (now := ticks(run_dir)) == before:
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        time.sleep(0.002)
    return now, run_ms(pid)


#: Ticks before the measurement starts (imports and first files done).
WARMUP_TICKS = 5


def wait_until(cond, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise RuntimeError("timed out")
        time.sleep(0.05)


def start_record(
    work: Path, gpus: int, interval: float, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    run_dir = Path(tempfile.mkdtemp(prefix="gputel-bench-run-", dir=shm))
    cmd = [
        sys.executable, "-m", "gputel", "record",
        "--backend", "sim", "--sim-gpus", str(gpus), "--sim-pattern", "0:2,85:3600",
        "--interval", str(interval), "--log-dir", str(work / "log"), "--run-dir", str(run_dir),
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, run_dir


@dataclass
class TickResult:
    gpus: int
    ticks: int
    cpu_ms_per_tick: float
    rss_mib: float
    hwm_mib: float
    missed: int


def bench_ticks(gpus: int, interval: float, seconds: float) -> TickResult:
    with tempfile.TemporaryDirectory(prefix="gputel-bench-") as tmp:
        work = Path(tmp)
        proc, run_dir = start_record(work, gpus, interval, "--child")
        try:
            wait_until(lambda: ticks(run_dir) >= WARMUP_TICKS, 20 + WARMUP_TICKS * interval)
            t0, c0 = at_publication(run_dir, proc.pid)
            time.sleep(seconds)
            t1, c1 = at_publication(run_dir, proc.pid)
            rss, hwm = rss_mib(proc.pid), rss_mib(proc.pid, "VmHWM")
            state = (run_dir / "recorder.json").read_text()
            missed = int(re.search(r'"ticks_missed": ?(\d+)', state).group(1))  # type: ignore[union-attr]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            shutil.rmtree(run_dir, ignore_errors=True)
    return TickResult(gpus, t1 - t0, (c1 - c0) / (t1 - t0), rss, hwm, missed)


@dataclass
class ScrapeResult:
    name: str
    scrapes: int
    cpu_ms_per_scrape: float
    latency_ms_median: float
    latency_ms_p99: float
    bytes: int
    rss_mib: float


def bench_scrapes(name: str, pid: int, url: str, n: int) -> ScrapeResult:
    for _ in range(10):
        urllib.request.urlopen(url, timeout=5).read()
    lat: list[float] = []
    size = 0
    c0 = cpu_seconds(pid)
    for _ in range(n):
        t = time.perf_counter()
        with urllib.request.urlopen(url, timeout=5) as resp:
            size = len(resp.read())
        lat.append((time.perf_counter() - t) * 1000)
    c1 = cpu_seconds(pid)
    lat.sort()
    return ScrapeResult(
        name,
        n,
        (c1 - c0) / n * 1000,
        statistics.median(lat),
        lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        size,
        rss_mib(pid),
    )


def scrape_gputel(gpus: int, n: int) -> ScrapeResult:
    with tempfile.TemporaryDirectory(prefix="gputel-bench-") as tmp:
        work = Path(tmp)
        port = free_port()
        # A long interval: after the first tick the process only serves scrapes.
        proc, run_dir = start_record(
            work, gpus, 3600, "--exporter-addr", "127.0.0.1", "--exporter-port", str(port)
        )
        try:
            wait_until(lambda: ticks(run_dir) >= 1)
            return bench_scrapes(f"gputel record ({gpus} GPUs)", proc.pid,
                                 f"http://127.0.0.1:{port}/metrics", n)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=10)
            shutil.rmtree(run_dir, ignore_errors=True)


def scrape_node_exporter(n: int) -> ScrapeResult | None:
    if not Path(NODE_EXPORTER).exists():
        return None
    port = free_port()
    proc = subprocess.Popen(
        [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/metrics"
    try:

        def up() -> bool:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                return True
            except OSError:
                return False

        wait_until(up)
        return bench_scrapes("node_exporter (default collectors)", proc.pid, url, n)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def breakdown(gpus: int, n: int = 40, pause: float = 0.1) -> dict[str, float]:
    """Thread CPU per tick of each stage, in-process, with a pause between ticks (cold caches).

    Only to say where the time goes; the subprocess figures above are the measurement.
    """
    from collections.abc import Callable
    from typing import Any

    from gputel.settings import load_settings
    from gputel.sources.select import open_gpu_source, open_host_sources
    from gputel.telemetry.recorder import Recorder

    parts: dict[str, float] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.thread_time_ns()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0) + time.thread_time_ns() - t

        return wrapper

    with tempfile.TemporaryDirectory(prefix="gputel-bench-") as tmp:
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="gputel-bench-run-", dir=shm) as run:
            settings = load_settings(
                env={},
                overrides={"backend": "sim", "sim_gpus": str(gpus), "log_dir": tmp, "run_dir": run},
            )
            gpu, _ = open_gpu_source(settings)
            hosts = open_host_sources(settings)
            rec = Recorder(settings, gpu, hosts)
            gpu.read = timed(f"source {gpu.name} (GPUs)", gpu.read)  # type: ignore[method-assign]
            for h in hosts:
                h.read = timed(f"source {h.name}", h.read)  # type: ignore[method-assign]
            rec.sink.write = timed("CSV rows", rec.sink.write)  # type: ignore[method-assign]
            rec.exposition.update = timed("exposition render", rec.exposition.update)  # type: ignore[method-assign]
            rec._publish = timed("metrics.prom + recorder.json", rec._publish)  # type: ignore[method-assign]
            for _ in range(10):
                rec.tick()
            parts.clear()
            total = 0
            for _ in range(n):
                time.sleep(pause)
                t = time.thread_time_ns()
                rec.tick()
                total += time.thread_time_ns() - t
            rec.close()
    out = {k: v / n / 1e6 for k, v in parts.items()}
    out["whole tick"] = total / n / 1e6
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ne = "absent"
    if Path(NODE_EXPORTER).exists():
        out = subprocess.run([NODE_EXPORTER, "--version"], capture_output=True, text=True)
        ne = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"
    return (
        f"{model}, {os.cpu_count()} logical CPUs; Linux {platform.release()}; "
        f"Python {platform.python_version()}; {ne}"
    )


def report(ticks_: list[TickResult], scrapes: list[ScrapeResult], ref: ScrapeResult | None,
           interval: float, parts: dict[str, float]) -> str:  # fmt: skip
    lines = [
        SECTION,
        "",
        f"Measured by `benchmarks/bench_record.py` on {time.strftime('%Y-%m-%d', time.gmtime())}.",
        "",
        f"Machine: {machine()}.",
        "",
        "### CPU per tick and memory",
        "",
        f"The real `gputel record --child --backend sim` subprocess at `--interval {interval:g}`"
        " (the default: every tick renders the exposition and publishes the state files),"
        " with the real host sources (procfs, RAPL, hwmon under `/sys`), CSV to the root"
        " filesystem, `metrics.prom`/`recorder.json` to tmpfs. CPU is the process's on-CPU"
        " time (`/proc/PID/task/*/schedstat`, ns resolution) over the measured ticks, after"
        f" {WARMUP_TICKS} warm-up ticks.",
        "",
        "| simulated GPUs | ticks measured | CPU per tick | CPU at 1 s interval | RSS | peak RSS"
        " | missed ticks |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in ticks_:
        lines.append(
            f"| {t.gpus} | {t.ticks} | {t.cpu_ms_per_tick:.2f} ms | "
            f"{t.cpu_ms_per_tick / 10:.2f} % of a core | {t.rss_mib:.1f} MiB | "
            f"{t.hwm_mib:.1f} MiB | {t.missed} |"
        )
    lines += [
        "",
        "Where the time of a tick goes with 8 GPUs (thread CPU per tick of each stage, measured"
        " in-process with a 0.1 s pause between ticks; indicative only):",
        "",
        "| stage | CPU per tick |",
        "|---|---:|",
    ]
    for k, v in parts.items():
        lines.append(f"| {k} | {v:.3f} ms |")
    lines += [
        "",
        "### Scrapes of /metrics",
        "",
        "Sequential scrapes over loopback from one client; CPU is the serving process's user +"
        " system time divided by the number of scrapes. gputel serves bytes rendered at the last"
        " tick (no tick runs during the measurement); node_exporter collects on every scrape,"
        " which is the comparison that matters for a Prometheus server scraping both.",
        "",
        "| exporter | scrapes | CPU per scrape | ratio to node_exporter | latency median | "
        "latency p99 | body | RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in [*scrapes, *([ref] if ref else [])]:
        ratio = f"{s.cpu_ms_per_scrape / ref.cpu_ms_per_scrape:.2f}×" if ref else "—"
        lines.append(
            f"| {s.name} | {s.scrapes} | {s.cpu_ms_per_scrape:.3f} ms | {ratio} | "
            f"{s.latency_ms_median:.2f} ms | {s.latency_ms_p99:.2f} ms | {s.bytes / 1024:.1f} KiB |"
            f" {s.rss_mib:.1f} MiB |"
        )
    eight = next((t for t in ticks_ if t.gpus == 8), None)
    worst_rss = max((t.hwm_mib for t in ticks_), default=float("nan"))
    lines += ["", "### Against the targets", ""]
    if eight:
        ok = "met" if eight.cpu_ms_per_tick <= 2.0 else "**missed**"
        lines.append(
            f"- CPU per tick with 8 GPUs plus host sources ≤ 2 ms: {eight.cpu_ms_per_tick:.2f} ms"
            f" ({ok})."
        )
        if eight.cpu_ms_per_tick > 2.0 and "source host" in parts:
            own = sum(v for k, v in parts.items() if not k.startswith(("source", "whole")))
            lines.append(
                f"  In the breakdown the procfs host source takes {parts['source host']:.2f} ms"
                f" of a tick and the recorder's own stages (CSV, exposition, state files)"
                f" {own:.2f} ms."
            )
    ok = "met" if worst_rss <= 45 else "**missed**"
    lines.append(f"- RSS ≤ 45 MiB: peak {worst_rss:.1f} MiB over all runs ({ok}).")
    if ref and scrapes:
        ratio = max(s.cpu_ms_per_scrape for s in scrapes) / ref.cpu_ms_per_scrape
        ok = "met" if ratio <= 0.25 else "**missed**"
        lines.append(f"- CPU per scrape ≤ 0.25× node_exporter's: {ratio:.2f}× at worst ({ok}).")
    lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace (or add) this benchmark's section, leaving other sections of the page alone."""
    text = path.read_text() if path.exists() else "# Performance\n\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION) :], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        text = text[:start] + section + ("\n" + text[end:] if nxt else "")
    path.write_text(text.rstrip("\n") + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    ap.add_argument("--quick", action="store_true", help="a short run to check the script")
    args = ap.parse_args()
    seconds = 5.0 if args.quick else 40.0
    n_scrapes = 50 if args.quick else 300
    # The default interval: every tick renders the exposition and publishes the state files
    # (at sub-second intervals that happens about once a second, so a shorter interval would
    # not measure a whole tick's work).
    interval = 1.0
    tick_results = []
    for gpus in (1, 8, 64):
        r = bench_ticks(gpus, interval, seconds)
        print(f"tick {gpus:>2} GPUs: {r}", flush=True)
        tick_results.append(r)
    scrape_results = []
    for gpus in (8, 64):
        s = scrape_gputel(gpus, n_scrapes)
        print(f"scrape: {s}", flush=True)
        scrape_results.append(s)
    ref = scrape_node_exporter(n_scrapes)
    print(f"scrape: {ref}", flush=True)
    parts = breakdown(8)
    section = report(tick_results, scrape_results, ref, interval, parts)
    if args.write:
        write_section(args.write, section)
    print()
    print(section)


if __name__ == "__main__":
    main()
