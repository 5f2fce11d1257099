"""Benchmark of the control socket: request latency and failures while idle clients pile up.

A child process serves the control socket with ``ControlServer`` and a handler that answers a
fixed status object. The benchmark sends ``status`` requests one after another (a new
connection each, as ``gputel status`` and the hooks do), first alone, then while a flood thread
keeps hundreds of Unix connections open that never send a byte, opening new ones as the server
closes old ones. A request fails when it is refused or takes more than its 1 s timeout.

    python benchmarks/bench_control.py [--requests 300] [--flood 400] [--src DIR] [--write FILE]

``--src`` runs another checkout's server (its ``src`` directory), for a before/after figure.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from flood import IdleConnections  # noqa: E402

SERVER = """
import sys
from pathlib import Path
from gputel.control.server import ControlServer
status = {"agent": "running", "state": "idle", "gpus": [{"index": i} for i in range(8)]}
server = ControlServer(Path(sys.argv[1]), lambda req: dict(status))
server.start()
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Result:
    flood: int
    requests: int
    failures: int
    median_ms: float
    p99_ms: float
    max_ms: float
    cpu_ms: float
    flood_opened: int


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(src: Path, requests: int, keep: int) -> Result:
    from gputel.control.client import request
    from gputel.control.protocol import ControlError

    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        run_dir = Path(tmp)
        path = run_dir / "control.sock"
        env = {**os.environ, "PYTHONPATH": str(src)}
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        times: list[float] = []
        failures = 0
        try:
            with IdleConnections([(socket.AF_UNIX, str(path), keep)], period=0.02) as idle:
                if keep:
                    time.sleep(1.0)
                cpu0 = cpu_s(proc.pid)
                for _ in range(requests):
                    t0 = time.perf_counter()
                    try:
                        ok = request(run_dir, {"op": "status"}, timeout=1.0).get("ok") is True
                    except ControlError:
                        ok = False
                    times.append(time.perf_counter() - t0)
                    failures += not ok
                cpu = cpu_s(proc.pid) - cpu0
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            proc.wait(5)
    times.sort()
    return Result(
        flood=keep,
        requests=requests,
        failures=failures,
        median_ms=statistics.median(times) * 1e3,
        p99_ms=times[int(0.99 * (len(times) - 1))] * 1e3,
        max_ms=times[-1] * 1e3,
        cpu_ms=cpu / requests * 1e3,
        flood_opened=idle.opened,
    )


def table(results: list[Result]) -> str:
    lines = [
        "| idle connections kept | opened in all | requests | failed | latency median | p99 "
        "| max | server CPU per request |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.flood} | {r.flood_opened} | {r.requests} | {r.failures} | "
            f"{r.median_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.max_ms:.2f} ms | {r.cpu_ms:.2f} ms |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--flood", type=int, default=400)
    parser.add_argument("--src", type=Path, default=ROOT / "src")
    parser.add_argument("--write", type=Path, help="append the table to this file")
    args = parser.parse_args()
    results = [run(args.src, args.requests, 0), run(args.src, args.requests, args.flood)]
    cpu = platform.processor() or platform.machine()
    head = (
        f"Measured by `benchmarks/bench_control.py` ({args.src}) on {time.strftime('%Y-%m-%d')}; "
        f"{os.cpu_count()} logical CPUs ({cpu}); Linux {platform.release()}; "
        f"Python {platform.python_version()}."
    )
    text = head + "\n\n" + table(results) + "\n"
    print(text)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
