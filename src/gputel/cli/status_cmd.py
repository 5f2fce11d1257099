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

from gputel.cli.options import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    LOCAL_SNAPSHOT,
    fail,
    settings_options_only,
)
from gputel.formats import UNKNOWN, display_time, one_line
from gputel.settings import Settings, parse_duration
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
    """A value for a cell: unknown (None) is ``–``, never 0."""
    if value is None:
        return UNKNOWN
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
        return f"{text}{unit}"
    return str(value)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return UNKNOWN
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _pair(used: Any, total: Any, unit: str = "") -> str:
    """``used/total unit``; ``–`` for a side not known, ``–`` alone when neither is."""
    if used is None and total is None:
        return UNKNOWN
    return f"{_fmt(used)}/{_fmt(total)}{unit}"


def _rounded(value: Any) -> int | None:
    return round(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def throttle_cell(g: dict[str, Any]) -> str:
    """The active clock event reasons by name (the schema's table), ``none``, or ``–``."""
    from gputel.schema import clock_event_names

    mask = g.get("clock_event_reasons")
    names = clock_event_names(int(mask)) if isinstance(mask, (int, float)) else None
    if names is None:
        return UNKNOWN
    return ", ".join(names) or "none"


def gpu_state(g: dict[str, Any]) -> str:
    """``stuck`` (its read hangs), ``lost`` (off the bus, refused) or empty."""
    if g.get("stuck"):
        return "stuck"
    if g.get("lost"):
        return "lost"
    return ""


def _known_gpu_keys() -> frozenset[str]:
    from dataclasses import fields

    from gputel.schema import GpuReading

    return frozenset(f.name for f in fields(GpuReading)) | {
        "activity_pct",
        "throttle_reasons",
        "values_from",
        "values_at",
        "gpm",
    }


#: What ``gpm`` says when there is nothing to explain (the ``sm`` column shows the rest).
_GPM_PLAIN = (None, "available", "not supported")


def _note_value(value: Any) -> str:
    if isinstance(value, str):
        return one_line(value)
    return json.dumps(value, separators=(",", ":"), default=str)


def notes(entry: dict[str, Any], known: frozenset[str]) -> list[str]:
    """The fields of ``entry`` this view has no column or line for, that say something: shown
    as ``key`` (a true flag) or ``key: value``, so a field the agent learns to report shows up
    here before anyone writes a column for it."""
    out: list[str] = []
    gpm = entry.get("gpm")
    if gpm not in _GPM_PLAIN:
        out.append(f"gpm {_note_value(gpm)}")  # "gpm refused: <why>; <fix>"
    for key, value in entry.items():
        if key in known or value is None or value is False or value == "" or value == []:
            continue
        if value == {}:
            continue
        out.append(key if value is True else f"{key}: {_note_value(value)}")
    return out


def gpu_allocations(status: dict[str, Any]) -> dict[int, list[str]]:
    """GPU index → the ids of the open allocations on it (``gpus`` null: every GPU)."""
    indices = [g.get("index") for g in status.get("gpus") or [] if isinstance(g, dict)]
    out: dict[int, list[str]] = {i: [] for i in indices if isinstance(i, int)}
    for a in status.get("allocations") or []:
        if not isinstance(a, dict):
            continue
        gl = a.get("gpus")
        for i in out:
            if gl is None or (isinstance(gl, list) and i in gl):
                out[i].append(str(a.get("id")))
    return out


def _gpu_table(table_cls: Any, status: dict[str, Any], gpus: list[dict[str, Any]]) -> Any:
    """One row per GPU with what ``nvidia-smi`` users look for first."""
    known = _known_gpu_keys()
    allocs = gpu_allocations(status)
    states = [gpu_state(g) for g in gpus]
    extra = [notes(g, known) for g in gpus]
    from rich import box

    # No vertical rules: at 80 columns every character goes to the values.
    table = table_cls(
        title="GPUs",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=17)
    if any(states):
        table.add_column("state", no_wrap=True)
    for title in ("util", "sm", "memory MiB", "°C", "power W"):
        table.add_column(title, justify="right", no_wrap=True)
    table.add_column("throttle", min_width=8, overflow="fold")
    table.add_column("allocation", min_width=10)
    if any(extra):
        table.add_column("notes")
    for g, state, more in zip(gpus, states, extra, strict=True):
        index = g.get("index")
        row = [_fmt(index), str(g.get("name") or "")]
        if any(states):
            row.append(f"[red]{state}[/red]" if state else "")
        row += [
            _fmt(g.get("utilization_gpu_pct"), 0, "%"),
            _fmt(g.get("sm_active_pct"), 0, "%"),
            _pair(g.get("memory_used_mib"), g.get("memory_total_mib")),
            _fmt(g.get("temperature_c"), 0),
            _pair(_rounded(g.get("power_w")), _rounded(g.get("power_limit_w"))),
            throttle_cell(g),
            ",".join(allocs.get(index, [])) if isinstance(index, int) else "",
        ]
        if any(extra):
            row.append("; ".join(more))
        table.add_row(*row)
    return table


def values_caption(gpus: list[dict[str, Any]]) -> str | None:
    """Where an agent's GPU values come from (``gputel.gpu_status``), or None (local read)."""
    sources = {(g.get("values_from"), g.get("values_at")) for g in gpus if "values_from" in g}
    if not sources:
        return None
    parts = ["utilization from the agent's poll"]
    for source, at in sorted(sources, key=lambda x: (str(x[0]), str(x[1]))):
        when = f" at {display_time(at)}" if at else ""
        if source == "recorder":
            parts.append(f"the rest from the recorder's tick{when}")
        elif source == "agent":
            parts.append(f"the rest from the agent's light read{when} (no limits or throttle)")
        else:
            parts.append("no other values while telemetry is off and no light read is made")
    return "values: " + "; ".join(dict.fromkeys(parts))


def _process_table(table_cls: Any, processes: list[dict[str, Any]]) -> Any:
    """nvidia-smi's process table, with the owner's user and job."""
    table = table_cls(title="processes", title_justify="left")
    for col, justify in (
        ("gpu", "right"),
        ("pid", "right"),
        ("user", "left"),
        ("job", "left"),
        ("memory MiB", "right"),
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


#: Top-level status keys this view shows (or leaves to --json on purpose); any other key with
#: something to say is printed as ``key: value``.
_SHOWN_KEYS = frozenset(
    {
        "ok",
        "agent",
        "pid",
        "version",
        "uptime_s",
        "state",
        "mode",
        "mode_until",
        "telemetry_active",
        "telemetry_reason",
        "reason",
        "utilization_pct",
        "activity",
        "allocations",
        "gpus",
        "processes",
        "processes_notice",
        "child",
        "transitions",
        "recent_transitions",
        "events",
        "degraded",
        "backend",
        "source",
        "notice",
        "log_dir",
        "run_dir",
        "exporter",
        "exporter_error",
        "interval_s",
        "settings",
        "write_failures",
        "host",
    }
)


def renderables(status: dict[str, Any]) -> list[Any]:
    """The human view of a status object, as rich renderables (printed, or live in --watch)."""
    from rich.table import Table
    from rich.text import Text

    parts: list[Any] = []

    def out(markup: str) -> None:
        parts.append(Text.from_markup(markup))

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
        until = display_time(status.get("mode_until"))
        out(
            f"state: {status.get('state') or UNKNOWN}   mode: {mode or UNKNOWN}"
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
    for key, value in status.items():
        if key in _SHOWN_KEYS or value is None or value is False or value in ("", [], {}):
            continue
        out(f"[yellow]{key}:[/yellow] {_note_value(value)}")
    gpus = [g for g in status.get("gpus") or [] if isinstance(g, dict)]
    if status.get("notice") and (gpus or agent == "running"):
        out(f"[yellow]notice:[/yellow] {status['notice']}")
    if gpus:
        parts.append(_gpu_table(Table, status, gpus))
        caption = values_caption(gpus)
        if caption:
            out(f"[dim]{caption}[/dim]")
    elif agent == "running":
        out("GPUs: none")
    else:
        notice = str(status.get("notice") or "none present or selected")
        out(f"no GPU found: {notice.removeprefix('no GPU telemetry: ')}")

    processes = [p for p in status.get("processes") or [] if isinstance(p, dict)]
    if status.get("processes_notice"):
        out(f"[yellow]processes:[/yellow] {status['processes_notice']}")
    if processes:
        parts.append(_process_table(Table, processes))

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
                    _fmt(display_time(a.get("start"))),
                    "detected" if a.get("detected") else "announced",
                )
        parts.append(table)
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
                    _fmt(display_time(t.get("timestamp") or t.get("at"))),
                    _fmt(t.get("from_state") or t.get("from")),
                    _fmt(t.get("to_state") or t.get("to")),
                    _fmt(t.get("reason")),
                )
        parts.append(table)

    events = status.get("events") or []
    if events:
        table = Table(title="recent GPU events", title_justify="left")
        for col in ("time", "gpu", "event", "xid", "action", "allocations"):
            table.add_column(col)
        for e in events[-10:]:
            if isinstance(e, dict):
                table.add_row(
                    _fmt(display_time(e.get("timestamp"))),
                    _fmt(e.get("gpu")),
                    _fmt(e.get("event")),
                    _fmt(e.get("xid")),
                    _fmt(e.get("action")),
                    ",".join(str(a) for a in e.get("allocations") or []) or UNKNOWN,
                )
        parts.append(table)

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
    return parts


def render_human(status: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    for part in renderables(status):
        console.print(part)


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
            since = display_time(f.get("since")) or UNKNOWN
            lines.append(
                f"[red]writes failing:[/red] {f.get('file')}{who} failing since {since}, "
                f"{rows}{why}"
            )
        else:
            lines.append(f"[yellow]writes:[/yellow] {f.get('file')}{who} recovered, {rows}")
    return lines


# ---------------------------------------------------------------------------------- command
WATCH_DEFAULT_S = 2.0
WATCH_MIN_S = 0.1


def fetch_status(settings: Settings, flags: dict[str, str]) -> tuple[dict[str, Any], int]:
    """(the status object, exit code): the agent's when one answers, else a local snapshot.

    ``flags``: the settings flags given; they shape a local snapshot only, so with an agent
    running a flag that differs from the agent's own setting is refused (exit 2).
    """
    from gputel.cli.agent_flags import agent_status, refuse_unreachable

    reply = agent_status(settings.run_dir)
    if reply is None:
        status, failed = local_status(settings)
        return status, EXIT_FAILURE if failed else EXIT_OK
    refuse_unreachable(flags, reply)
    status = {k: v for k, v in reply.items() if k != "ok"}
    status.setdefault("agent", "running")
    return status, EXIT_OK


def _emit(status: dict[str, Any], as_json: bool, indent: int | None = 2) -> None:
    if as_json:
        sys.stdout.write(json.dumps(status, indent=indent, default=str) + "\n")
    else:
        render_human(status)


def status_command(settings: Settings, as_json: bool, flags: dict[str, str] | None = None) -> int:
    status, code = fetch_status(settings, flags or {})
    _emit(status, as_json)
    if code != EXIT_OK and status.get("notice"):
        print(f"gputel: {status['notice']}", file=sys.stderr)
    return code


def watch_command(
    settings: Settings,
    as_json: bool,
    interval_s: float,
    flags: dict[str, str] | None = None,
    *,
    live: bool | None = None,
    sleep: Any = time.sleep,
) -> int:
    """Refresh the status every ``interval_s`` until Ctrl-C (exit 0).

    On a terminal the view is redrawn in place (rich ``Live``); otherwise (a pipe, a file, or
    ``--json``: one JSON object per line) each refresh is printed after the last, with the time
    it was taken, so a log of it reads in order.
    """
    from gputel.formats import iso_utc_ms

    live = sys.stdout.isatty() and not as_json if live is None else live
    try:
        if live:
            from rich.console import Group
            from rich.live import Live
            from rich.text import Text

            def view() -> Any:
                status, _ = fetch_status(settings, flags or {})
                head = Text(
                    f"gputel status every {interval_s:g}s, {iso_utc_ms()} (Ctrl-C to stop)",
                    style="dim",
                )
                return Group(head, *renderables(status))

            with Live(view(), auto_refresh=False, screen=False) as screen:
                while True:
                    sleep(interval_s)
                    screen.update(view(), refresh=True)
        while True:
            status, _ = fetch_status(settings, flags or {})
            if as_json:
                _emit(status, True, indent=None)
            else:
                print(f"--- {iso_utc_ms()}")
                render_human(status)
            sys.stdout.flush()
            sleep(interval_s)
    except KeyboardInterrupt:
        return EXIT_OK


def parse_watch_interval(text: str | None) -> float:
    """Seconds between refreshes of ``--watch``, or exit 2 naming ``--interval``."""
    if text is None:
        return WATCH_DEFAULT_S
    try:
        value = parse_duration(text)
    except ValueError as exc:
        fail(f"invalid --interval {text!r}: {exc}", EXIT_USAGE)
    if not WATCH_MIN_S <= value <= 3600:
        fail(f"invalid --interval {text!r}: use {WATCH_MIN_S:g} to 3600 seconds", EXIT_USAGE)
    return value


def register(app: typer.Typer) -> None:
    """Add ``gputel status`` to ``app``."""

    @app.command("status")
    @settings_options_only(*LOCAL_SNAPSHOT)
    def status(
        settings: Settings,
        settings_flags: dict[str, str],
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
        watch: bool = typer.Option(
            False, "--watch", "-w", help="Refresh until Ctrl-C (in place on a terminal)."
        ),
        interval: str | None = typer.Option(
            None,
            "--interval",
            metavar="SECONDS",
            help=f"Seconds between refreshes of --watch (default {WATCH_DEFAULT_S:g}).",
            show_default=False,
        ),
    ) -> None:
        """Agent, state, mode, GPUs (utilization, SM activity, memory, temperature, power,
        throttle reasons, allocation), recorder child and allocations (a local snapshot when no
        agent runs)."""
        if interval is not None and not watch:
            fail("--interval is the refresh of --watch; add --watch", EXIT_USAGE)
        if watch:
            code = watch_command(settings, as_json, parse_watch_interval(interval), settings_flags)
        else:
            code = status_command(settings, as_json, settings_flags)
        if code:
            raise typer.Exit(code)
