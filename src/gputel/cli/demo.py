"""``gputel demo``: one idle → busy → idle cycle of the real agent on simulated GPUs.

No root, no GPU, nothing touched outside one temporary directory: the agent runs as a subprocess
(``python -m gputel agent``) with its run and log directories in there, a short sim pattern and
short thresholds, and the demo watches it through the control socket exactly as ``gputel status``
would. It ends by stopping the agent and showing the CSV files it left behind, which are kept so
they can be opened in pandas afterwards.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from gputel.formats import UNKNOWN, display_time, human_number

#: GPU 0 idles 3 s, works 8 s (4 of them at full power, held by the power cap), idles; GPU 1
#: works a little later and less.
DEMO_PATTERN = "0:3,85:4,100:4,0:30;0:4,55:6,0:30"
DEMO_INTERVAL_S = 0.5
DEMO_START_S = 1.0
DEMO_STOP_S = 3.0
#: GPU 0 reports Xid 94 (a contained ECC error) while it works: a row in events.csv, the
#: counter, and a short capture window (DEMO_CAPTURE_S) that ends before the cycle does.
DEMO_EVENTS = "0:94@6"
DEMO_CAPTURE_S = 2.0
#: The job the demo opens through the hook API when the GPUs get busy and releases when they are
#: quiet again, as a scheduler's prolog and epilog would: ``gputel job`` answers for it.
DEMO_JOB = "demo-job-1"
#: Utilization (%) under which, on every GPU, the demo's job is done.
JOB_DONE_PCT = 10.0
#: What the demo runs to call the hook API in the agent's environment (its run directory).
_HOOK_SCRIPT = (
    "import sys; from gputel import hooks; "
    "r = hooks.allocation_created(sys.argv[2]) if sys.argv[1] == 'open' "
    "else hooks.allocation_released(sys.argv[2]); "
    "print(r.detail); sys.exit(0 if r.ok else 1)"
)


@dataclass
class DemoResult:
    ok: bool
    directory: Path
    log_dir: Path
    message: str
    states_seen: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    """The session as ``gputel report --json`` gives it (None without the analysis extra)."""
    plot: Path | None = None
    """The timeline picture, when matplotlib is installed."""
    job: str | None = None
    """The allocation the demo opened and released through the hook API (None if it could not)."""


def _free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return int(s.getsockname()[1])


def demo_env(
    directory: Path,
    *,
    pattern: str = DEMO_PATTERN,
    interval_s: float = DEMO_INTERVAL_S,
    start_s: float = DEMO_START_S,
    stop_s: float = DEMO_STOP_S,
    events: str = DEMO_EVENTS,
    port: int | None = None,
) -> dict[str, str]:
    """The agent's environment: ours minus service-manager and gputel variables, plus the demo's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPUTEL_", "_GPUTEL_"))
        and k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env.update(
        GPUTEL_BACKEND="sim",
        GPUTEL_SIM_GPUS="2",
        GPUTEL_SIM_PATTERN=pattern,
        GPUTEL_SIM_EVENTS=events,
        GPUTEL_EVENT_CAPTURE_SECONDS=f"{DEMO_CAPTURE_S:g}",
        GPUTEL_INTERVAL=f"{interval_s:g}",
        GPUTEL_START_UTIL="20",
        GPUTEL_START_SECONDS=f"{start_s:g}",
        GPUTEL_STOP_UTIL="10",
        GPUTEL_STOP_SECONDS=f"{stop_s:g}",
        GPUTEL_RUN_DIR=str(directory / "run"),
        GPUTEL_LOG_DIR=str(directory / "log"),
        GPUTEL_EXPORTER_ADDR="127.0.0.1",
        GPUTEL_EXPORTER_PORT=str(_free_port() if port is None else port),
    )
    return env


_SPARKS = "▁▂▃▄▅▆▇█"
#: How many polls of utilization the live view's sparkline shows.
SPARK_POINTS = 32


def sparkline(values: Iterable[float | None]) -> Text:
    """Utilization history as one line of block characters (0-100 %), a gap where unknown."""
    chars = []
    for v in values:
        if v is None:
            chars.append(" ")
        else:
            level = round(max(0.0, min(100.0, v)) / 100 * (len(_SPARKS) - 1))
            chars.append(_SPARKS[level])
    return Text("".join(chars), style="green")


def _power(watts: object) -> Text:
    if not isinstance(watts, (int, float)):
        return Text(UNKNOWN, style="dim")
    return Text(f"{watts:6.1f} W")


def _bar(pct: float | None, width: int = 20) -> Text:
    if pct is None:
        return Text(UNKNOWN, style="dim")
    filled = round(width * max(0.0, min(100.0, pct)) / 100)
    style = "green" if pct >= 20 else "dim"
    return Text("█" * filled + "░" * (width - filled) + f" {pct:5.1f}%", style=style)


_STATE_STYLE = {"idle": "dim", "arming": "yellow", "active": "bold green", "cooling": "cyan"}


def render(
    status: dict[str, Any] | None,
    elapsed: float,
    note: str = "",
    history: Mapping[int, Iterable[float | None]] | None = None,
) -> Group:
    """One frame of the live view from a status reply (None: the agent is not answering yet);
    ``history`` is each GPU's recent utilization, oldest first, for the sparkline."""
    if not status:
        return Group(Panel(Text(f"starting the agent... {elapsed:4.1f}s {note}".rstrip())))
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    state = str(status.get("state"))
    head.add_row("state", Text(state, style=_STATE_STYLE.get(state, "")))
    head.add_row("mode", str(status.get("mode")))
    on = bool(status.get("telemetry_active"))
    child = status.get("child") or {}
    head.add_row(
        "telemetry",
        Text(
            f"ON (recorder pid {child.get('pid')})" if on and child else ("ON" if on else "off"),
            style="bold green" if on else "dim",
        ),
    )
    head.add_row("elapsed", f"{elapsed:5.1f}s")
    if status.get("exporter"):
        head.add_row("metrics", f"http://{status['exporter']}/metrics")

    gpus = Table(title="GPUs (simulated)", expand=False)
    gpus.add_column("GPU", justify="right")
    gpus.add_column("name")
    gpus.add_column("utilization")
    gpus.add_column("power", justify="right")
    gpus.add_column(f"utilization, last {SPARK_POINTS} polls")
    for g in status.get("gpus") or []:
        index = g.get("index")
        past = (history or {}).get(index, ()) if isinstance(index, int) else ()
        gpus.add_row(
            str(index),
            str(g.get("name")),
            _bar(g.get("utilization_gpu_pct")),
            _power(g.get("power_w")),
            sparkline(past),
        )

    trans = Table(title="transitions", expand=False)
    trans.add_column("time")
    trans.add_column("from")
    trans.add_column("to")
    trans.add_column("reason")
    for t in (status.get("transitions") or [])[-6:]:
        trans.add_row(
            display_time(t.get("timestamp")) or "",
            t.get("from_state"),
            t.get("to_state"),
            t.get("reason"),
        )
    parts: list[Any] = [Panel(head, title="gputel agent"), gpus, trans]
    events = status.get("events") or []
    if events:
        table = Table(title="GPU events", expand=False)
        for col in ("time", "GPU", "event", "xid", "action"):
            table.add_column(col)
        for e in events[-4:]:
            table.add_row(
                display_time(e.get("timestamp")) or "",
                str(e.get("gpu")),
                str(e.get("event")),
                "" if e.get("xid") is None else str(e.get("xid")),
                str(e.get("action")),
            )
        parts.append(table)
    return Group(*parts)


def _head(path: Path, lines: int) -> list[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.rstrip("\n") for _, line in zip(range(lines), fh, strict=False)]
    except OSError:
        return []


def run_demo(
    console: Console | None = None,
    *,
    directory: Path | None = None,
    keep: bool = True,
    max_seconds: float = 40.0,
    pattern: str = DEMO_PATTERN,
    interval_s: float = DEMO_INTERVAL_S,
    start_s: float = DEMO_START_S,
    stop_s: float = DEMO_STOP_S,
    events: str = DEMO_EVENTS,
    poll_s: float = 0.25,
) -> DemoResult:
    """Run the cycle, show it live, stop the agent, print the files; never leaves a process."""
    from gputel.control.client import request
    from gputel.control.protocol import ControlError

    console = console or Console()
    directory = Path(directory or tempfile.mkdtemp(prefix="gputel-demo-"))
    directory.mkdir(parents=True, exist_ok=True)
    env = demo_env(
        directory,
        pattern=pattern,
        interval_s=interval_s,
        start_s=start_s,
        stop_s=stop_s,
        events=events,
    )
    run_dir = Path(env["GPUTEL_RUN_DIR"])
    log_dir = Path(env["GPUTEL_LOG_DIR"])
    agent_log = directory / "agent.log"
    console.print(
        f"[bold]gputel demo[/]: the real agent on 2 simulated GPUs, pattern [cyan]{pattern}[/], "
        f"start after {start_s:g}s busy, stop after {stop_s:g}s quiet, tick {interval_s:g}s"
    )
    console.print(f"working directory: {directory}")
    seen: list[str] = []
    went_on = went_off = finished = False
    message = ""
    with open(agent_log, "wb") as log_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gputel", "agent"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    t0 = time.monotonic()
    status: dict[str, Any] | None = None
    history: dict[int, deque[float | None]] = {}
    job = _DemoJob(env)
    # The agent takes SIGHUP as "reopen the CSV files" (logrotate), so closing the terminal
    # would leave it running: turn SIGHUP and SIGTERM into an exit that runs the cleanup below.
    previous = _exit_on_signals((signal.SIGHUP, signal.SIGTERM))
    try:
        with Live(render(None, 0.0), console=console, refresh_per_second=8) as live:
            while True:
                elapsed = time.monotonic() - t0
                code = proc.poll()
                if code is not None:
                    message = f"the agent exited early with code {code}; see {agent_log}"
                    break
                try:
                    reply = request(run_dir, {"op": "status"}, timeout=1.0)
                    status = reply if reply.get("ok") else status
                except ControlError:
                    pass
                if status:
                    for g in status.get("gpus") or []:
                        if isinstance(g.get("index"), int):
                            past = history.setdefault(g["index"], deque(maxlen=SPARK_POINTS))
                            past.append(g.get("utilization_gpu_pct"))
                    state = str(status.get("state"))
                    if not seen or seen[-1] != state:
                        seen.append(state)
                    if status.get("telemetry_active"):
                        went_on = True
                    elif went_on:
                        went_off = True
                    job.follow(status)
                live.update(render(status, elapsed, history=history))
                if went_on and went_off and status and status.get("state") == "idle":
                    message = "one full idle → busy → idle cycle"
                    finished = True
                    break
                if elapsed > max_seconds:
                    message = f"the cycle did not finish within {max_seconds:g}s"
                    break
                time.sleep(poll_s)
    finally:
        job.finish()
        _stop(proc)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    ok = finished and proc.returncode == 0
    files = sorted(log_dir.glob("*.csv")) if log_dir.is_dir() else []
    _show_files(console, log_dir, files)
    summary = plot_path = None
    job_id = DEMO_JOB if job.released else None
    if ok:
        summary, plot_path = _answer(console, log_dir, directory / "timeline.png", job_id)
    if ok:
        console.print(f"[bold green]done[/]: {message}; the agent exited cleanly.")
    else:
        console.print(f"[bold red]demo failed[/]: {message or 'the agent did not exit cleanly'}")
        tail = _head(agent_log, 200)[-10:]
        for line in tail:
            console.print(Text(f"  agent.log | {line}", style="dim"))
    if keep:
        console.print(f"files kept in {directory} (remove it when done)")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return DemoResult(ok, directory, log_dir, message, seen, files, summary, plot_path, job_id)


class _DemoJob:
    """The demo's job: opened through the hook API once the agent is active, released once the
    GPUs are quiet, each call a short process in the agent's environment (so it finds the agent's
    socket).

    ``phase`` goes waiting → opening → open → releasing → released (or failed); the live view
    never waits for a call.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = {**env, "GPU_TELEMETRY_AUTOSTART": "1"}
        self.call: subprocess.Popen[bytes] | None = None
        self.phase = "waiting"

    @property
    def released(self) -> bool:
        return self.phase == "released"

    def _run(self, op: str, phase: str) -> None:
        self.phase = phase
        self.call = subprocess.Popen(
            [sys.executable, "-c", _HOOK_SCRIPT, op, DEMO_JOB],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _settle(self, wait: float = 0.0) -> None:
        """Move on from a finished call: opening → open, releasing → released, or failed."""
        if self.call is None:
            return
        try:
            code = self.call.wait(timeout=wait) if wait else self.call.poll()
        except subprocess.TimeoutExpired:
            self.call.kill()
            code = self.call.wait()
        if code is None:
            return
        self.call = None
        if code != 0:
            self.phase = "failed"
        else:
            self.phase = {"opening": "open", "releasing": "released"}.get(self.phase, self.phase)

    def follow(self, status: Mapping[str, Any]) -> None:
        self._settle()
        utils = [
            u
            for g in status.get("gpus") or []
            if isinstance(u := g.get("utilization_gpu_pct"), (int, float))
        ]
        if not utils:
            return
        if self.phase == "waiting" and status.get("state") == "active":
            self._run("open", "opening")
        elif self.phase == "open" and max(utils) < JOB_DONE_PCT:
            self._run("release", "releasing")

    def finish(self) -> None:
        """Before the agent stops: wait for a call under way and release a job still open."""
        self._settle(wait=5.0)
        if self.phase == "open":
            self._run("release", "releasing")
            self._settle(wait=5.0)


def _answer(
    console: Console, log_dir: Path, picture: Path, job: str | None = None
) -> tuple[dict[str, Any] | None, Path | None]:
    """The recorded session as the report code sums it, the plot, and the commands to go on.

    Both come from the analysis code (DuckDB, matplotlib: the ``analysis`` extra); without it the
    demo says how to install it rather than summing the CSVs a second way.
    """
    from gputel.analysis.duck import AnalysisUnavailable, install_hint
    from gputel.analysis.plot import PlotUnavailable, plot
    from gputel.analysis.report import build_report

    console.print("\n[bold]The session[/] (from the report code, as `gputel report` sums it):")
    try:
        report = build_report([log_dir])
    except AnalysisUnavailable:
        console.print(f"  the summary needs the analysis extra: {install_hint()}", markup=False)
        return None, None
    sessions = [s for s in report["sessions"] if s["gpus"]]
    session = sessions[-1] if sessions else None
    if session is None:
        console.print("  no GPU rows were recorded")
        return None, None
    console.print(
        f"  duration {human_number(session['duration_s'], 1)} s, of which pre-trigger "
        f"{human_number(session.get('pretrigger_s'), 1)} s (recorded before telemetry started)"
    )
    table = Table(box=None, padding=(0, 2), show_edge=False)
    for col in ("GPU", "energy", "mean power", "peak power", "throttled"):
        table.add_column(col, justify="right")
    for g in session["gpus"]:
        table.add_row(
            str(g["gpu"]),
            f"{human_number(g['energy_j'], 1)} J",
            f"{human_number(g['power_mean_w'], 1)} W",
            f"{human_number(g['power_peak_w'], 1)} W",
            f"{human_number(g.get('throttled_s'), 1)} s",
        )
    console.print(table)
    made: Path | None = None
    try:
        plot([log_dir], picture)
        made = picture
        console.print(f"plot: {picture}", markup=False)
    except (PlotUnavailable, AnalysisUnavailable):
        console.print(f"no plot: it needs matplotlib ({install_hint()})", markup=False)
    console.print("go further:")
    console.print(f"  gputel report {log_dir}", markup=False)
    console.print(f"  gputel plot {log_dir} -o timeline.png", markup=False)
    if job is not None:
        console.print(f"what did the job {job} do:", markup=False)
        console.print(f"  gputel job {job} {log_dir}", markup=False)
    return session, made


def _exit_on_signals(signums: tuple[int, ...]) -> dict[int, Any]:
    """Raise SystemExit on these signals (main thread only); returns the handlers replaced."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def leave(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    return {s: signal.signal(s, leave) for s in signums}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _show_files(console: Console, log_dir: Path, files: list[Path]) -> None:
    console.print(f"\n[bold]CSV files[/] in {log_dir}:")
    if not files:
        console.print("  (none)")
    for path in files:
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        console.print(f"  {path.name}  ({size} bytes)")
    for path in files:
        lines = _head(path, 12 if path.name == "transitions.csv" else 3)
        if not lines:
            continue
        console.print(f"\n[bold]{path.name}[/] (first {len(lines)} lines):")
        for line in lines:
            console.print(Text("  " + line, no_wrap=True, overflow="ellipsis"))
