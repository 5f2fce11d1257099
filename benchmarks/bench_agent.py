"""Benchmark: the idle agent's cost on 8 simulated GPUs, and ``gputel status``/``hook`` latency.

The agent runs as a real subprocess exactly as systemd would start it (exporter on, sim backend,
utilization 0 so no recorder child). CPU time is the sum over all its threads of
``/proc/PID/task/*/schedstat`` (nanosecond run time, unlike the 10 ms ticks of ``utime``),
measured after a warm-up so start-up imports are not charged to the steady state. RSS is
``VmRSS`` at the end and ``VmHWM`` (peak). Status latency is the wall time of the whole
``gputel status --json`` command (interpreter start-up included: that is what an operator
waits for) and of one control-socket round trip. Hook latency is the wall time of the whole
``gputel hook allocate ID`` and ``gputel hook release ID`` commands a Slurm prolog and epilog run,
with the agent's mode set to off for the duration so no recorder child starts in between.

    python benchmarks/bench_agent.py                 # 60 s at 1 s ticks
    python benchmarks/bench_agent.py --pretrigger 0  # the same without the pre-trigger ring
    python benchmarks/bench_agent.py --write         # and append to docs/performance.md

``--ring-memory`` instead measures, in-process with ``tracemalloc``, the memory of a full
pre-trigger ring of 8 GPUs at the largest window the settings allow (3600 ticks).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "performance.md"
SECTION = "## gputel agent"
TARGET_CPU_S_PER_H = 2.0
TARGET_RSS_MIB = 40.0
TARGET_STATUS_MS = 150.0
TARGET_HOOK_MS = 150.0


def cpu_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def mem_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (
        f"{model} ({platform.machine()}), {os.cpu_count()} CPUs visible, "
        f"Linux {platform.release()}, Python {platform.python_version()}"
    )


def run_cli(argv: list[str], env: dict[str, str]) -> float:
    """Wall time of one whole ``gputel`` command in ms; a failure ends the benchmark."""
    a = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "gputel", *argv], env=env, capture_output=True, timeout=30
    )
    took = (time.perf_counter() - a) * 1000
    if r.returncode != 0:
        raise SystemExit(f"gputel {' '.join(argv)} failed: {r.stderr.decode()}")
    return took


def append_report(doc: Path, report: str) -> None:
    """Add ``report`` at the end of this benchmark's section, creating the section if needed."""
    text = doc.read_text() if doc.exists() else "# Performance\n"
    lines = text.rstrip("\n").split("\n")
    if SECTION not in lines:
        doc.write_text("\n".join(lines) + f"\n\n{SECTION}\n\n{report}\n")
        return
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    body = lines[:end]
    while body and not body[-1].strip():
        body.pop()
    rest = lines[end:]
    out = [*body, "", *report.split("\n")]
    if rest:
        out += ["", *rest]
    doc.write_text("\n".join(out) + "\n")


def ring_memory() -> str:
    """Bytes held by a full pre-trigger ring of 8 GPUs at the largest window (3600 ticks)."""
    import tracemalloc

    from gputel.settings import MAX_PRETRIGGER_TICKS
    from gputel.sources.sim import SimGpuSource
    from gputel.supervisor.pretrigger import PretriggerRing

    source = SimGpuSource(8, "0:10,90:100000", None, epoch=0.0, clock=lambda: 20.0)
    readings = source.read_light()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ring = PretriggerRing(float(MAX_PRETRIGGER_TICKS), 1.0, source.devices())
    for k in range(2 * MAX_PRETRIGGER_TICKS):
        ring.add(float(k), 1.7e9 + k, readings)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    t = time.thread_time_ns()
    for k in range(10_000):
        ring.add(1e6 + k, 1.7e9 + k, readings)
    add_us = (time.thread_time_ns() - t) / 10_000 / 1000
    return (
        f"full ring, 8 GPUs, {len(ring)} ticks: {held / 1024:.0f} KiB "
        f"({held / len(ring):.0f} B per tick); add() {add_us:.1f} µs per tick"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="measured period")
    ap.add_argument("--interval", type=float, default=1.0, help="agent tick")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--status-runs", type=int, default=9)
    ap.add_argument("--write", action="store_true", help=f"append results to {DOC}")
    ap.add_argument(
        "--pretrigger", default=None, help="GPUTEL_PRETRIGGER_SECONDS (default: the setting's)"
    )
    ap.add_argument("--ring-memory", action="store_true", help="measure a full ring, in-process")
    args = ap.parse_args()
    if args.ring_memory:
        print(ring_memory())
        return 0

    from gputel.control.client import request

    tmp = Path(tempfile.mkdtemp(prefix="gputel-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))}
    for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(k, None)
    env.update(
        GPUTEL_BACKEND="sim",
        GPUTEL_SIM_GPUS="8",
        GPUTEL_SIM_PATTERN="0:100000",
        GPUTEL_INTERVAL=f"{args.interval:g}",
        GPUTEL_RUN_DIR=str(tmp / "run"),
        GPUTEL_LOG_DIR=str(tmp / "log"),
        GPUTEL_EXPORTER_ADDR="127.0.0.1",
        GPUTEL_EXPORTER_PORT=str(free_port()),
    )
    if args.pretrigger is not None:
        env["GPUTEL_PRETRIGGER_SECONDS"] = args.pretrigger
    from gputel.settings import load_settings

    pretrigger_s = load_settings(env=env).pretrigger_s
    agent = subprocess.Popen(
        [sys.executable, "-m", "gputel", "agent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(tmp / "agent.log", "wb"),  # noqa: SIM115
    )
    run_dir = tmp / "run"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                request(run_dir, {"op": "status"}, timeout=1.0)
                break
            except Exception:
                if time.monotonic() > deadline or agent.poll() is not None:
                    log_path = tmp / "agent.log"
                    raise SystemExit(f"the agent did not come up; see {log_path}") from None
                time.sleep(0.1)
        time.sleep(args.warmup)
        c0, t0 = cpu_ns(agent.pid), time.monotonic()
        time.sleep(args.seconds)
        c1, t1 = cpu_ns(agent.pid), time.monotonic()
        mem = mem_kib(agent.pid)
        status = request(run_dir, {"op": "status"}, timeout=2.0)
        assert status["telemetry_active"] is False and status["child"] is None, status
        assert len(status["gpus"]) == 8

        rtt = []
        for _ in range(args.status_runs):
            a = time.perf_counter()
            request(run_dir, {"op": "status"}, timeout=2.0)
            rtt.append((time.perf_counter() - a) * 1000)
        cli = [run_cli(["status", "--json"], env) for _ in range(args.status_runs)]
        request(run_dir, {"op": "set_mode", "mode": "off", "for_s": None}, timeout=2.0)
        hook: list[float] = []
        for n in range(args.status_runs):
            hook.append(run_cli(["hook", "allocate", f"bench-{n}", "--quiet"], env))
            hook.append(run_cli(["hook", "release", f"bench-{n}", "--quiet"], env))
        request(run_dir, {"op": "set_mode", "mode": "auto", "for_s": None}, timeout=2.0)
        c2 = cpu_ns(agent.pid)
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)

    elapsed = t1 - t0
    ticks = elapsed / args.interval
    cpu_s = (c1 - c0) / 1e9
    per_tick_ms = cpu_s / ticks * 1000
    per_hour = cpu_s / elapsed * 3600
    rss = mem.get("VmRSS", 0) / 1024
    hwm = mem.get("VmHWM", 0) / 1024
    cli_ms = statistics.median(cli)
    rtt_ms = statistics.median(rtt)
    hook_ms = statistics.median(hook)
    ok = lambda good: "met" if good else "MISSED"  # noqa: E731
    lines = [
        f"Run {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.",
        f"Agent idle on 8 simulated GPUs (utilization 0, no recorder child), exporter on, "
        f"{args.interval:g} s ticks, pre-trigger {pretrigger_s:g} s, measured for "
        f"{elapsed:.0f} s after a {args.warmup:g} s warm-up.",
        "",
        "| measure | result | target |",
        "|---|---|---|",
        f"| CPU per tick (all threads) | {per_tick_ms:.3f} ms | |",
        f"| CPU per hour at {args.interval:g} s ticks | {per_hour:.2f} s | "
        f"≤ {TARGET_CPU_S_PER_H:g} s ({ok(per_hour <= TARGET_CPU_S_PER_H)}) |",
        f"| RSS at end / peak | {rss:.1f} / {hwm:.1f} MiB | "
        f"≤ {TARGET_RSS_MIB:g} MiB ({ok(max(rss, hwm) <= TARGET_RSS_MIB)}) |",
        f"| `gputel status --json`, whole command (median of {len(cli)}) | {cli_ms:.0f} ms "
        f"(min {min(cli):.0f}, max {max(cli):.0f}) | ≤ {TARGET_STATUS_MS:g} ms "
        f"({ok(cli_ms <= TARGET_STATUS_MS)}) |",
        f"| `gputel hook allocate`/`release`, whole command (median of {len(hook)}) | "
        f"{hook_ms:.0f} ms (min {min(hook):.0f}, max {max(hook):.0f}) | ≤ {TARGET_HOOK_MS:g} ms "
        f"({ok(hook_ms <= TARGET_HOOK_MS)}) |",
        f"| control-socket `status` round trip (median of {len(rtt)}) | {rtt_ms:.2f} ms | |",
        f"| agent CPU for all {len(rtt) + len(cli) + len(hook) + 2} control requests | "
        f"{(c2 - c1) / 1e6:.1f} ms | |",
    ]
    report = "\n".join(lines)
    print(report)
    if args.write:
        append_report(DOC, report)
        print(f"appended to {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
