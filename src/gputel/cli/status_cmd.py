"""``gputel status``: what the agent is doing, or, with no agent, what this node looks like now.

With an agent, its own status object is shown (one socket round trip, no GPU read here, so it
stays fast). Without one, a local snapshot is taken: the GPU read runs with a deadline
(``supervisor/deadline.py``), because a wedged driver can block an NVML call forever and status
must still answer.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import asdict
from typing import Any

import typer

from gputel.cli.operator_cmd import human_time
from gputel.cli.options import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, fail, settings_options
from gputel.formats import one_line
from gputel.settings import Settings
from gputel.supervisor.deadline import start_job

GPU_READ_DEADLINE_S = 2.0
HOST_CPU_WINDOW_S = 0.1
"""Gap between two host reads, so CPU utilization and RAPL power have a delta to work with."""


# ---------------------------------------------------------------------------------- local snapshot
def _read_gpus(
    settings: Settings,
) -> tuple[list[dict[str, Any]], str | None, str | None, dict[str, Any]]:
    """(gpus, source name, notice, processes): open the GPU source, read once, close.

    ``processes``: ``{"processes": [...], "processes_notice": ...}``, the GPU processes with
    their owners from ``GPUTEL_PROC_ROOT``, as the agent's status gives them.
    """
    from gputel.sources.select import open_gpu_source
    from gputel.telemetry.jobs import ProcessAttribution

    source, notice = open_gpu_source(settings)
    try:
        readings = source.read()
        gpm = {d.index: d.gpm for d in source.devices()}
    finally:
        source.close()
    attribution = ProcessAttribution(settings.proc_root)
    processes = {
        "processes": [asdict(p) for p in attribution.records(readings)],
        "processes_notice": attribution.notice,
    }
    gpus = [_reading_dict(r, gpm.get(r.index)) for r in readings]
    return gpus, getattr(source, "name", None), notice, processes


def _reading_dict(reading: Any, gpm: str | None) -> dict[str, Any]:
    # asdict: a MIG GPU's devices (MigReading) become JSON objects too; processes are listed apart.
    out = {k: v for k, v in asdict(reading).items() if k != "processes"}
    out["gpm"] = gpm  # available, not supported, or refused with the reason and the fix
    return out


def _host_snapshot(settings: Settings) -> tuple[dict[str, Any], str | None]:
    try:
        from gputel.schema import HostReading
        from gputel.sources.select import open_host_sources

        sources = open_host_sources(settings)
    except Exception as exc:
        return {}, f"no host telemetry: {one_line(exc)}"
    reading = HostReading()
    for attempt in range(2):
        if attempt:
            time.sleep(HOST_CPU_WINDOW_S)
        for source in sources:
            try:
                reading.merge(source.read())
            except Exception:
                continue  # a source fails alone; its fields stay null
    host = asdict(reading)
    hwmon = host.pop("hwmon_temperatures_c", {}) or {}
    host["hwmon_temperatures_c"] = {f"{chip}/{label}": t for (chip, label), t in hwmon.items()}
    for source in sources:
        close = getattr(source, "close", None)
        if callable(close):
            with contextlib.suppress(Exception):
                close()
    return host, None


def local_status(settings: Settings) -> tuple[dict[str, Any], bool]:
    """The status object when no agent runs, and whether an explicitly wanted GPU source failed.

    The GPU read runs with a deadline, next to the host read; a wrong ``GPUTEL_GPUS`` is a bad
    setting (exit 2), not "no GPU".
    """
    from gputel.sources.base import GpuSelectionError

    gpu_job = start_job(lambda: _read_gpus(settings), name="gputel-status-gpu")
    host, host_notice = _host_snapshot(settings)
    gpu_job.done.wait(GPU_READ_DEADLINE_S)
    outcome, value = gpu_job.outcome()
    gpus: list[dict[str, Any]] = []
    source: str | None = None
    notice: str | None
    processes: dict[str, Any] = {"processes": [], "processes_notice": None}
    failed = outcome != "ok"
    if outcome == "ok":
        gpus, source, notice, processes = value
    elif outcome == "error":
        if isinstance(value, GpuSelectionError):
            fail(str(value), EXIT_USAGE)
        notice = f"no GPU telemetry: {one_line(value)}"
    else:
        notice = (
            f"the GPU read did not finish within {GPU_READ_DEADLINE_S:g}s (a hung driver or "
            "GPU?); no GPU values shown"
        )
    notices = [n for n in (notice, host_notice) if n]
    status = {
        "agent": "not running",
        "state": None,
        "mode": None,
        "mode_until": None,
        "telemetry_active": False,
        "allocations": [],
        "gpus": gpus,
        **processes,
        "host": host,
        "backend": settings.backend,
        "source": source,
        "run_dir": str(settings.run_dir),
        "notice": "; ".join(notices) if notices else None,
    }
    return status, failed and settings.backend != "auto"


# ---------------------------------------------------------------------------------- rendering
def _fmt(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return f"{text}{unit}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


_GPU_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("util", ("utilization_gpu_pct",)),
    ("memory (MiB)", ("memory_used_mib", "memory_total_mib")),
    ("temp", ("temperature_c",)),
    ("power", ("power_w",)),
    ("clock", ("sm_clock_mhz",)),
)


def _gpu_cell(title: str, g: dict[str, Any]) -> str:
    if title == "util":
        return _fmt(g.get("utilization_gpu_pct"), 0, " %")
    if title == "memory (MiB)":
        return f"{_fmt(g.get('memory_used_mib'))} / {_fmt(g.get('memory_total_mib'))}"
    if title == "temp":
        return _fmt(g.get("temperature_c"), 0, " °C")
    if title == "power":
        return _fmt(g.get("power_w"), 0, " W")
    return _fmt(g.get("sm_clock_mhz"), 0, " MHz")


def _gpu_table(table_cls: Any, gpus: list[dict[str, Any]]) -> Any:
    """Index and name, then only the value columns some GPU has (the agent sends utilization)."""
    shown = [
        title
        for title, keys in _GPU_COLUMNS
        if any(g.get(k) is not None for g in gpus for k in keys)
    ]
    table = table_cls(title="GPUs", title_justify="left")
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=28)
    for title in shown:
        table.add_column(title, justify="right", no_wrap=True)
    for g in gpus:
        name = str(g.get("name") or "")
        if g.get("lost"):
            name += " [red](lost)[/red]"
        table.add_row(_fmt(g.get("index")), name, *(_gpu_cell(t, g) for t in shown))
    return table


def _process_table(table_cls: Any, processes: list[dict[str, Any]]) -> Any:
    """nvidia-smi's process table, with the owner's user and job."""
    table = table_cls(title="processes", title_justify="left")
    for col, justify in (
        ("gpu", "right"),
        ("pid", "right"),
        ("user", "left"),
        ("job", "left"),
        ("memory (MiB)", "right"),
        ("sm", "right"),
        ("command", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "command")
    for p in processes:
        table.add_row(
            _fmt(p.get("gpu")),
            _fmt(p.get("pid")),
            _fmt(p.get("user")),
            _fmt(p.get("job")),
            _fmt(p.get("memory_used_mib")),
            _fmt(p.get("sm_util_pct"), 0, " %"),
            _fmt(p.get("command")),
        )
    return table


def render_human(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    out = console.print
    agent = status.get("agent", "not running")
    if agent != "running":
        out(f"agent: {agent}")
    else:
        bits = ["agent: running"]
        if status.get("pid"):
            bits.append(f"pid {status['pid']}")
        if status.get("uptime_s") is not None:
            bits.append(f"up {_duration(status.get('uptime_s'))}")
        out(", ".join(bits))
        mode = status.get("mode")
        until = human_time(status.get("mode_until"))
        out(
            f"state: {status.get('state') or '–'}   mode: {mode or '–'}"
            + (f" until {until}" if until else "")
        )
        active = status.get("telemetry_active")
        reason = status.get("telemetry_reason") or status.get("reason")
        out(f"telemetry: {'on' if active else 'off'}" + (f" ({reason})" if reason else ""))
        child = status.get("child")
        if isinstance(child, dict) and child.get("pid"):
            out(f"recorder: pid {child['pid']}, up {_duration(child.get('uptime_s'))}")
            files = child.get("files")
            if isinstance(files, dict):
                for kind, path in files.items():
                    if path:
                        out(f"  {kind} file: {path}")
        if status.get("exporter_error"):
            out(f"[red]exporter:[/red] {status['exporter_error']} (retrying)")
        degraded = status.get("degraded")
        if degraded:
            items = degraded if isinstance(degraded, list) else [degraded]
            for item in items:
                out(f"[yellow]degraded:[/yellow] {item}")
    gpus = status.get("gpus") or []
    if status.get("notice") and (gpus or agent == "running"):
        out(f"[yellow]notice:[/yellow] {status['notice']}")
    if gpus:
        console.print(_gpu_table(Table, [g for g in gpus if isinstance(g, dict)]))
    elif agent == "running":
        out("GPUs: none")
    else:
        notice = str(status.get("notice") or "none present or selected")
        out(f"no GPU found: {notice.removeprefix('no GPU telemetry: ')}")

    processes = [p for p in status.get("processes") or [] if isinstance(p, dict)]
    if status.get("processes_notice"):
        out(f"[yellow]processes:[/yellow] {status['processes_notice']}")
    if processes:
        console.print(_process_table(Table, processes))

    allocations = status.get("allocations") or []
    if allocations:
        table = Table(title="allocations", title_justify="left")
        for col in ("id", "gpus", "pid", "since", "kind"):
            table.add_column(col)
        for a in allocations:
            if isinstance(a, dict):
                gl = a.get("gpus")
                table.add_row(
                    str(a.get("id")),
                    "all" if gl is None else ",".join(str(x) for x in gl),
                    _fmt(a.get("pid")),
                    _fmt(a.get("start")),
                    "detected" if a.get("detected") else "announced",
                )
        console.print(table)
    elif agent == "running":
        out("allocations: none")

    transitions = status.get("transitions") or status.get("recent_transitions") or []
    if transitions:
        table = Table(title="recent transitions", title_justify="left")
        for col in ("time", "from", "to", "reason"):
            table.add_column(col)
        for t in transitions[-10:]:
            if isinstance(t, dict):
                table.add_row(
                    _fmt(human_time(t.get("timestamp") or t.get("at"))),
                    _fmt(t.get("from_state") or t.get("from")),
                    _fmt(t.get("to_state") or t.get("to")),
                    _fmt(t.get("reason")),
                )
        console.print(table)

    events = status.get("events") or []
    if events:
        table = Table(title="recent GPU events", title_justify="left")
        for col in ("time", "gpu", "event", "xid", "action", "allocations"):
            table.add_column(col)
        for e in events[-10:]:
            if isinstance(e, dict):
                table.add_row(
                    _fmt(human_time(e.get("timestamp"))),
                    _fmt(e.get("gpu")),
                    _fmt(e.get("event")),
                    _fmt(e.get("xid")),
                    _fmt(e.get("action")),
                    ",".join(str(a) for a in e.get("allocations") or []) or "–",
                )
        console.print(table)

    for line in write_failure_lines(status):
        out(line)

    host = status.get("host")
    if isinstance(host, dict) and host:
        out(
            "host: "
            f"cpu {_fmt(host.get('cpu_util_pct'), 0, ' %')}, "
            f"load {_fmt(host.get('load_1m'), 2)}, "
            f"memory used {_fmt(host.get('memory_used_mib'), 0, ' MiB')}, "
            f"cpu package {_fmt(host.get('cpu_package_power_w'), 0, ' W')}"
        )


def write_failure_lines(status: dict[str, Any]) -> list[str]:
    """One line per file whose rows are failing (or failed) to be written: which file, since
    when, how many rows, why."""
    lines = []
    for f in status.get("write_failures") or []:
        if not isinstance(f, dict):
            continue
        who = f" ({f['writer']})" if f.get("writer") else ""
        rows = f"{_fmt(f.get('rows_failed'))} rows lost"
        why = f": {f['error']}" if f.get("error") else ""
        if f.get("failing"):
            since = human_time(f.get("since")) or "–"
            lines.append(
                f"[red]writes failing:[/red] {f.get('file')}{who} failing since {since}, "
                f"{rows}{why}"
            )
        else:
            lines.append(f"[yellow]writes:[/yellow] {f.get('file')}{who} recovered, {rows}")
    return lines


# ---------------------------------------------------------------------------------- command
def status_command(settings: Settings, as_json: bool) -> int:
    from gputel.control.client import request
    from gputel.control.protocol import AgentTimeout, AgentUnavailable, ControlError

    try:
        reply = request(settings.run_dir, {"op": "status"}, timeout=2.0)
    except AgentUnavailable as exc:
        if not exc.no_agent:
            fail(str(exc))
        status, failed = local_status(settings)
        code = EXIT_FAILURE if failed else EXIT_OK
    except AgentTimeout as exc:
        fail(f"{exc}: the agent is running but stuck (see journalctl -u gputel or agent.log)")
    except ControlError as exc:
        fail(str(exc))
    else:
        if not reply.get("ok", False):
            fail(f"the agent refused status: {reply.get('error', 'no reason given')}")
        status = {k: v for k, v in reply.items() if k != "ok"}
        status.setdefault("agent", "running")
        code = EXIT_OK
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2, default=str) + "\n")
    else:
        render_human(status)
    if code != EXIT_OK and status.get("notice"):
        print(f"gputel: {status['notice']}", file=sys.stderr)
    return code


def register(app: typer.Typer) -> None:
    """Add ``gputel status`` to ``app``."""

    @app.command("status")
    @settings_options
    def status(
        settings: Settings,
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Agent, state, mode, GPUs, recorder child and allocations (a local snapshot when no
        agent runs)."""
        code = status_command(settings, as_json)
        if code:
            raise typer.Exit(code)
