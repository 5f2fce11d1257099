"""Benchmark of how GPUs are read per tick: the readers' CPU per GPU, before and after, and the
whole recorder's CPU per tick, before and after, in one run.

Every GPU is one of the test suite's fake ``libnvidia-ml.so.1`` read through NVIDIA's real
binding, with GPM (ten metrics answered) and 4 compute processes. Needs gcc (the fake is built on
the fly) and git (the "before" recorder is the sources at ``--before``).

1. Readers, in this process, for 1, 8 and 64 GPUs at 0.1 s ticks: CPU of the whole process
   (``getrusage``: every thread) per tick, divided by the GPU count, for

   - ``inline``: ``source.read()`` on the calling thread (no isolation from a hung GPU: the floor);
   - ``before``: a thread per GPU, all woken each tick (``ThreadedReaders`` below, the design
     this replaced, kept here verbatim in behaviour);
   - ``after``: ``telemetry/gpu_deadline.py`` over ``gputel.gpu_readers.GpuReaders`` (one worker,
     GPU after GPU).

2. The recorder: ``gputel record --child`` over the same fake driver, 8 GPUs, 0.1 s ticks, host
   sources on, CPU of the whole process per tick (``/proc/PID/task/*/schedstat``, ns), for the
   sources at ``--before`` (``git archive``) and this working tree, alternating, ``--repeat``
   times. Owners of the GPU processes come from a fake ``/proc`` tree (``GPUTEL_PROC_ROOT``).

    .venv/bin/python benchmarks/bench_gpu_readers.py [--write docs/performance.md] [--quick]

Not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import fakedriver  # noqa: E402
from bench_owners import cpu_model  # noqa: E402
from bench_record import at_publication, ticks, wait_until  # noqa: E402
from bench_report import write_section  # noqa: E402
from fakeproc import add_kthreadd, add_process  # noqa: E402
from gputel.schema import GpuReading  # noqa: E402
from gputel.sources import nvml  # noqa: E402
from gputel.telemetry.gpu_deadline import DeadlineGpuSource  # noqa: E402

SECTION = "## Reading GPUs per tick"
BEFORE = "110dc5e"  # the sources before this round's reader and NVML work
INTERVAL = 0.1
PER_GPU = 4
FIRST_PID = 40_000
#: GPM metric id -> value: ten of the eleven metrics gputel asks for (tests/test_gpm_e2e.py).
GPM = {2: 61.5, 3: 33.2, 5: 40.0, 10: 72.5, 11: 0.5, 12: 12.0, 13: 3.0, 20: 100, 21: 250, 60: 1024}


# ----------------------------------------------------------------------- the design it replaced
class _Reader:
    """One GPU's reader thread, as before: woken by its condition, at most one read in flight."""

    def __init__(self, index: int, read: Callable[[int], GpuReading]) -> None:
        self.index = index
        self._read = read
        self._cond = threading.Condition()
        self._wanted = False
        self._busy = False
        self._result: GpuReading | None = None
        self._error: BaseException | None = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                self._wanted = False
            result: GpuReading | None = None
            error: BaseException | None = None
            try:
                result = self._read(self.index)
            except BaseException as exc:
                error = exc
            with self._cond:
                self._result, self._error, self._busy = result, error, False
                self._cond.notify_all()

    def start(self) -> bool:
        with self._cond:
            if self._busy:
                return False
            self._busy, self._wanted = True, True
            self._result = self._error = None
            self._cond.notify_all()
            return True

    def wait(self, timeout: float) -> tuple[GpuReading | None, BaseException | None] | None:
        with self._cond:
            if self._busy and not self._cond.wait_for(lambda: not self._busy, timeout):
                return None
            return self._result, self._error


class ThreadedReaders:
    """The recorder's read before ``GpuReaders``: every GPU's thread woken at once each tick."""

    def __init__(self, source: nvml.NvmlGpuSource, deadline_s: float) -> None:
        self.source = source
        self.deadline_s = deadline_s
        self._readers = {d.index: _Reader(d.index, source.read_gpu) for d in source.devices()}

    def read(self) -> list[GpuReading]:
        now = time.monotonic()
        started = {i: r.start() for i, r in self._readers.items()}
        end = now + self.deadline_s
        out: list[GpuReading] = []
        for d in self.source.devices():
            reader = self._readers[d.index]
            outcome = reader.wait(max(0.0, end - time.monotonic())) if started[d.index] else None
            if outcome is None or outcome[0] is None:
                out.append(GpuReading(d.index, d.uuid, d.name, stuck=outcome is None))
            else:
                out.append(outcome[0])
        return out


# ----------------------------------------------------------------------------- the fake node
def world(n: int) -> dict[str, object]:
    values = fakedriver.scenario(n)
    for g in range(n):
        values.update({f"gpu.{g}.gpm.{k}": v for k, v in GPM.items()})
        values[f"gpu.{g}.utilization.gpu_pct"] = 85
        values[f"gpu.{g}.processes"] = ",".join(
            f"{FIRST_PID + g * PER_GPU + k}:{(1 + k) * 1024 * fakedriver.MIB}:{10 + k}"
            for k in range(PER_GPU)
        )
    return values


def fake_proc(root: Path, n: int) -> None:
    add_kthreadd(root)
    for i in range(n * PER_GPU):
        add_process(
            root,
            FIRST_PID + i,
            cgroup=f"0::/system.slice/slurmstepd.scope/job_{1000 + i // PER_GPU}/step_0/task_0",
            uid=0,
            cmdline=("python", "train.py"),
        )


def process_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def paced(read: Callable[[], object], n_ticks: int) -> float:
    """CPU seconds of this process per tick over ``n_ticks`` reads at INTERVAL."""
    read()
    read()
    c0 = process_cpu()
    t = time.monotonic()
    for _ in range(n_ticks):
        read()
        t += INTERVAL
        time.sleep(max(0.0, t - time.monotonic()))
    return (process_cpu() - c0) / n_ticks


def bench_readers(
    driver: fakedriver.FakeDriver, sizes: list[int], n_ticks: int, repeat: int
) -> dict[int, dict[str, list[float]]]:
    """{gpus: {design: [µs CPU per GPU per tick, one per repeat]}}."""
    out: dict[int, dict[str, list[float]]] = {}
    for n in sizes:
        driver.write(world(n))
        nvml.reset_nvml_state()
        source = nvml.open_nvml(None)
        designs: dict[str, Callable[[], object]] = {
            "inline": source.read,
            "before": ThreadedReaders(source, 0.5).read,
            "after": DeadlineGpuSource(source, 0.5).read,
        }
        source.read()  # the first GPM sample has no pair yet
        assert all(r.processes and r.sm_active_pct is not None for r in source.read())
        runs = out.setdefault(n, {k: [] for k in designs})
        for _ in range(repeat):
            for name, read in designs.items():
                runs[name].append(paced(read, n_ticks) / n * 1e6)
        print(f"  {n} GPUs: " + ", ".join(f"{k} {min(v):.0f} µs" for k, v in runs.items()))
    return out


# ------------------------------------------------------------------------------ the recorder
def checkout(rev: str, dest: Path) -> Path:
    """The package sources at ``rev``, for PYTHONPATH."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "src"


def recorder_ms(
    driver: fakedriver.FakeDriver, src: Path, proc_root: Path, seconds: float, work: Path
) -> tuple[float, int]:
    """CPU ms per tick of ``gputel record --child`` from ``src``, and the ticks measured."""
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    run_dir = Path(tempfile.mkdtemp(prefix="gputel-bench-run-", dir=shm))
    env = driver.env(
        {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))},
        PYTHONPATH=str(src),
        GPUTEL_PROC_ROOT=str(proc_root),
    )
    cmd = [
        sys.executable, "-m", "gputel", "record", "--child", "--backend", "nvml",
        "--interval", str(INTERVAL), "--log-dir", str(work / "log"), "--run-dir", str(run_dir),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: ticks(run_dir) >= 20, 60)
        t0, c0 = at_publication(run_dir, proc.pid)
        time.sleep(seconds)
        t1, c1 = at_publication(run_dir, proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(work / "log", ignore_errors=True)
    return (c1 - c0) / (t1 - t0), t1 - t0


# ------------------------------------------------------------------------------ the report
def machine() -> str:
    return (
        f"{cpu_model()}, {os.cpu_count()} logical CPUs; Linux {platform.release()}; "
        f"Python {platform.python_version()}"
    )


def cell(values: list[float], fmt: str, unit: str) -> str:
    """The median, and the range of the runs in brackets."""
    med, lo, hi = (fmt.format(v) for v in (statistics.median(values), min(values), max(values)))
    return f"{med} {unit} ({lo}–{hi})"


def report(
    readers: dict[int, dict[str, list[float]]], rec: dict[str, list[float]], args: Any
) -> str:
    lines = [
        SECTION,
        "",
        f"Measured by `benchmarks/bench_gpu_readers.py` on {date.today().isoformat()}: every GPU "
        "one of the test suite's fake `libnvidia-ml.so.1` through NVIDIA's binding, with GPM "
        f"and {PER_GPU} compute processes, 0.1 s ticks.",
        "",
        f"Machine: {machine()}. Each figure is the median of {args.repeat} runs, the range of "
        "the runs in brackets.",
        "",
        "### The readers: µs CPU per GPU per tick (whole process, every thread)",
        "",
        "| GPUs | inline (no isolation) | before: a thread per GPU | after: one worker |",
        "|---:|---:|---:|---:|",
    ]
    for n, runs in readers.items():
        cells = [cell(runs[k], "{:.0f}", "µs") for k in ("inline", "before", "after")]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### The recorder: ms CPU per tick, whole process",
        "",
        f"`gputel record --child`, 8 GPUs, host sources on, {args.seconds:g} s measured after "
        "20 warm-up ticks (from one publication of `recorder.json` to another, so ticks and "
        "CPU match), before and after alternating; before = the sources at "
        f"`{args.before}`, after = this tree.",
        "",
        "| sources | ms CPU per tick |",
        "|---|---:|",
        f"| before | {cell(rec['before'], '{:.2f}', 'ms')} |",
        f"| after | {cell(rec['after'], '{:.2f}', 'ms')} |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", type=Path, help="update this markdown file's section")
    ap.add_argument("--quick", action="store_true", help="a short run to check the script")
    ap.add_argument("--before", default=BEFORE, help=f"git revision of 'before' (default {BEFORE})")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0, help="recorder seconds measured")
    ap.add_argument("--skip-readers", action="store_true")
    ap.add_argument("--skip-recorder", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.repeat, args.seconds = 1, 3.0
    n_ticks = 20 if args.quick else 100
    with tempfile.TemporaryDirectory(prefix="gputel-bench-readers-") as tmp:
        work = Path(tmp)
        lib = fakedriver.build(work / "lib")
        driver = fakedriver.FakeDriver(lib, work / "scenario.txt")
        readers: dict[int, dict[str, list[float]]] = {}
        if not args.skip_readers:
            fakedriver.preload(lib)
            os.environ[fakedriver.SCENARIO_ENV] = str(driver.path)
            print("readers (µs CPU per GPU per tick, best run):")
            readers = bench_readers(driver, [1, 8, 64], n_ticks, args.repeat)
        rec: dict[str, list[float]] = {"before": [], "after": []}
        if not args.skip_recorder:
            driver.write(world(8))
            fake_proc(work / "proc", 8)
            old = checkout(args.before, work / "before")
            print(f"recorder (ms CPU per tick; before = {args.before}):")
            for _ in range(args.repeat):
                for name, src in (("before", old), ("after", ROOT / "src")):
                    ms, n = recorder_ms(driver, src, work / "proc", args.seconds, work)
                    rec[name].append(ms)
                    print(f"  {name}: {ms:.2f} ms over {n} ticks")
        text = report(readers, rec, args) if readers and rec["after"] else None
    if text is not None:
        print()
        print(text)
        if args.write:
            write_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
