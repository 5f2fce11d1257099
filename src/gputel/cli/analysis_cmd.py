"""``gputel report``, ``replay``, ``plot`` and ``export``: answers from the recorded CSVs.

All four run on DuckDB (the ``analysis`` extra); without it they say how to install it.
"""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from gputel.analysis.filter import CsvReadError, ReportFilter, UnknownAllocation
from gputel.cli.options import EXIT_FAILURE, EXIT_USAGE, fail, settings_options_only
from gputel.formats import UNKNOWN, human_number, iso_utc_ms, parse_iso_utc, safe_text
from gputel.settings import Settings, parse_duration, parse_gpu_list

PathsArg = Annotated[
    list[Path] | None,
    typer.Argument(
        metavar="PATH",
        help="CSV files or directories (default: GPUTEL_LOG_DIR)",
        show_default=False,
    ),
]
SinceOpt = Annotated[
    str | None,
    typer.Option(
        "--since", metavar="TIME", help="start: ISO time (2026-11-22T10:00Z) or a duration ago (2h)"
    ),
]
UntilOpt = Annotated[
    str | None,
    typer.Option("--until", metavar="TIME", help="end: ISO time or a duration ago"),
]
GpuOpt = Annotated[str | None, typer.Option("--gpu", metavar="LIST", help="GPU indices, e.g. 0,1")]
#: What ``replay`` reads besides the files: the agent's thresholds and activity signal.
REPLAY_SETTINGS = ("start_util_pct", "start_seconds", "stop_util_pct", "stop_seconds", "activity")


def parse_when(text: str, now: float | None = None) -> float:
    """An ISO-8601 time (UTC unless it says otherwise) or a duration meaning that long ago."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return parse_iso_utc(text.strip()).timestamp()
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time nor a duration such as 2h") from None


def _filter(
    since: str | None, until: str | None, gpu: str | None, allocation: str | None = None
) -> ReportFilter:
    try:
        s = parse_when(since) if since else None
    except ValueError as exc:
        fail(f"invalid --since: {exc}", EXIT_USAGE)
    try:
        u = parse_when(until) if until else None
    except ValueError as exc:
        fail(f"invalid --until: {exc}", EXIT_USAGE)
    try:
        gpus = frozenset(parse_gpu_list(gpu)) if gpu else None
    except ValueError as exc:
        fail(f"invalid --gpu {gpu!r}: {exc}", EXIT_USAGE)
    return ReportFilter(since=s, until=u, gpus=gpus, allocation=allocation)


def input_paths(paths: list[Path] | None, settings: Settings) -> list[Path]:
    """The directories or files an analysis command reads: those named, else GPUTEL_LOG_DIR."""
    return list(paths) if paths else [settings.log_dir]


def _fmt(value: Any, digits: int = 1) -> str:
    """A report figure: a float at ``digits`` decimals, an int as it is, unknown as ``–``."""
    if isinstance(value, float):
        return human_number(value, digits)
    return UNKNOWN if value is None else str(value)


SESSION_COLUMNS = (
    "GPU",
    "samples",
    "missing",
    "util mean/p95/max %",
    "mem peak MiB",
    "temp max °C",
    "energy J (kWh)",
    "power mean/peak W",
    "throttled s",
)
ALLOCATION_COLUMNS = (
    "id",
    "GPUs",
    "start",
    "duration s",
    "util mean/max %",
    "mem peak MiB",
    "temp max °C",
    "energy J",
)


def _print_report(report: dict[str, Any]) -> None:
    """Per session a table (or stacked blocks where it does not fit), then the allocations."""
    from rich.console import Console

    from gputel.cli.fit import print_rows

    console = Console()
    if not report["sessions"] and not report["allocations"]:
        console.print("no telemetry rows in the given files and time range")
        return
    for s in report["sessions"]:
        host = s.get("host_stats") or {}
        title = (
            f"session {s['session']} {s['host']}  {s['start']} → {s['end']}  "
            f"({_fmt(s['duration_s'])} s)"
        )
        if host and host.get("cpu_util_mean_pct") is not None:
            title += f"  host CPU {_fmt(host['cpu_util_mean_pct'])} %"
        if host and host.get("rapl_energy_j") is not None:
            title += f"  RAPL {_fmt(host['rapl_energy_j'], 0)} J"
        rows = []
        for g in s["gpus"]:
            throttle = ", ".join(
                f"{k} {_fmt(v, 0)}" for k, v in g["throttle_s"].items() if k != "gpu_idle"
            )
            rows.append(
                [
                    f"{g['gpu']} {g['name']}".strip(),
                    str(g["samples"]),
                    str(g["missing"]),
                    f"{_fmt(g['util_mean_pct'])}/{_fmt(g['util_p95_pct'])}/"
                    f"{_fmt(g['util_max_pct'])}",
                    _fmt(g["memory_peak_mib"], 0),
                    _fmt(g["temperature_max_c"]),
                    f"{_fmt(g['energy_j'], 0)} ({_fmt(g['energy_kwh'], 4)})",
                    f"{_fmt(g['power_mean_w'])}/{_fmt(g['power_peak_w'])}",
                    throttle,
                ]
            )
        print_rows(console, title, SESSION_COLUMNS, rows)
    if report["allocations"]:
        rows = [
            [
                a["id"],
                ",".join(str(g) for g in a["gpus"]),
                str(a["start"]),
                _fmt(a["duration_s"]),
                f"{_fmt(a['util_mean_pct'])}/{_fmt(a['util_max_pct'])}",
                _fmt(a["memory_peak_mib"], 0),
                _fmt(a["temperature_max_c"]),
                _fmt(a["energy_j"], 0),
            ]
            for a in report["allocations"]
        ]
        print_rows(console, "allocations", ALLOCATION_COLUMNS, rows)


def _print_fleet(report: dict[str, Any], idle_util: float, idle_minutes: float) -> None:
    from rich.console import Console

    from gputel.cli.fit import print_rows

    console = Console()
    if len(report["nodes"]) > 1:
        print_rows(
            console,
            "nodes",
            (
                "node",
                "GPUs",
                "GPU-h recorded",
                "GPU-h busy",
                "energy kWh",
                "throttled s",
                "events",
                "idle allocations",
            ),
            [
                [
                    n["node"],
                    str(n["gpus"]),
                    _fmt(n["gpu_hours_recorded"], 2),
                    _fmt(n["gpu_hours_busy"], 2),
                    _fmt(n["energy_kwh"], 3),
                    _fmt(n["throttled_s"], 0),
                    str(n["events"]),
                    str(n["idle_allocations"]),
                ]
                for n in report["nodes"]
            ],
        )
        print_rows(
            console,
            "GPU models",
            ("model", "GPUs", "GPU-h recorded", "GPU-h busy", "energy kWh", "throttled s"),
            [
                [
                    m["model"],
                    str(m["gpus"]),
                    _fmt(m["gpu_hours_recorded"], 2),
                    _fmt(m["gpu_hours_busy"], 2),
                    _fmt(m["energy_kwh"], 3),
                    _fmt(m["throttled_s"], 0),
                ]
                for m in report["models"]
            ],
        )
    title = f"idle allocated GPUs (under {idle_util:g} % for more than {idle_minutes:g} min)"
    if not report["idle_allocations"]:
        console.print(f"{title}: none")
        return
    print_rows(
        console,
        title,
        ("node", "allocation", "idle GPUs", "longest idle min", "idle GPU-h"),
        [
            [
                i["node"],
                i["allocation"],
                ",".join(str(g) for g in i["gpus"]),
                _fmt(i["idle_minutes"]),
                _fmt(i["idle_gpu_hours"], 2),
            ]
            for i in report["idle_allocations"]
        ],
    )


def register(app: typer.Typer) -> None:
    """Add ``report``, ``replay``, ``plot`` and ``export``."""
    from gputel.analysis.duck import AnalysisUnavailable

    @app.command()
    @settings_options_only("log_dir")
    def report(
        paths: PathsArg = None,
        since: SinceOpt = None,
        until: UntilOpt = None,
        gpu: GpuOpt = None,
        allocation: Annotated[
            str | None,
            typer.Option("--allocation", metavar="ID", help="only rows of this allocation id"),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        as_csv: Annotated[bool, typer.Option("--csv", help="print CSV")] = False,
        idle_util: Annotated[
            float,
            typer.Option(
                "--idle-util",
                metavar="PERCENT",
                help="an allocated GPU under this utilization % is idle",
            ),
        ] = 5.0,
        idle_minutes: Annotated[
            float,
            typer.Option(
                "--idle-minutes",
                metavar="MINUTES",
                help="list allocations idle for longer than this",
            ),
        ] = 30.0,
        *,
        settings: Settings,
    ) -> None:
        """Summarise sessions, GPUs, allocations and nodes (plain or .gz CSVs, a tree of nodes).

        Lists idle allocated GPUs: allocations whose GPUs stayed under --idle-util for more
        than --idle-minutes, worst first.
        """
        from gputel.analysis.report import CSV_COLUMNS, build_report, report_rows

        if as_json and as_csv:
            fail("choose one of --json and --csv", EXIT_USAGE)
        if not 0 <= idle_util <= 100:
            fail(f"invalid --idle-util {idle_util:g}: use 0 to 100", EXIT_USAGE)
        if idle_minutes < 0:
            fail(f"invalid --idle-minutes {idle_minutes:g}: use 0 or more", EXIT_USAGE)
        flt = _filter(since, until, gpu, allocation)
        try:
            result = build_report(input_paths(paths, settings), flt, idle_util, idle_minutes)
        except AnalysisUnavailable as exc:
            fail(str(exc), EXIT_FAILURE)
        except CsvReadError as exc:
            fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read: {exc}")
        if as_json:
            json.dump(result, sys.stdout, indent=2)
            print()
        elif as_csv:
            writer = csv.DictWriter(sys.stdout, fieldnames=CSV_COLUMNS, lineterminator="\n")
            writer.writeheader()
            for row in report_rows(result):
                # The one cell rule for text (ids, node names) in every CSV gputel writes.
                writer.writerow(
                    {k: safe_text(v) if isinstance(v, str) else v for k, v in row.items()}
                )
        else:
            _print_report(result)
            if result["nodes"]:
                _print_fleet(result, idle_util, idle_minutes)

    @app.command()
    @settings_options_only("log_dir", *REPLAY_SETTINGS)
    def replay(
        paths: PathsArg = None,
        since: SinceOpt = None,
        until: UntilOpt = None,
        gpu: GpuOpt = None,
        sweep: Annotated[
            bool, typer.Option("--sweep", help="replay a small grid of thresholds")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        *,
        settings: Settings,
    ) -> None:
        """Replay recorded utilization through the agent's state machine with given thresholds.

        Thresholds and the activity signal come from the usual settings (--start-util,
        --start-seconds, --stop-util, --stop-seconds, --activity or GPUTEL_*), so the answer is
        what the agent would do with them.
        """
        from gputel.analysis.replay import load_series
        from gputel.analysis.replay import replay as run_replay
        from gputel.analysis.replay import sweep as run_sweep
        from gputel.supervisor.states import Thresholds

        flt = _filter(since, until, gpu)
        try:
            series = load_series(input_paths(paths, settings), flt, activity=settings.activity)
        except AnalysisUnavailable as exc:
            fail(str(exc), EXIT_FAILURE)
        except CsvReadError as exc:
            fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read: {exc}")
        if not len(series.ts):
            fail("no GPU rows in the given files and time range")
        base = Thresholds(
            settings.start_util_pct,
            settings.start_seconds,
            settings.stop_util_pct,
            settings.stop_seconds,
        )
        results = run_sweep(series, base) if sweep else [run_replay(series, base)]
        if as_json:
            out: Any = [r.to_dict() for r in results] if sweep else results[0].to_dict()
            json.dump(out, sys.stdout, indent=2)
            print()
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()

        if not sweep:
            r = results[0]
            console.print(
                f"{len(series.ts)} ticks at {series.interval:g} s; thresholds: start "
                f"≥{base.start_util_pct:g}% for {base.start_seconds:g}s, stop "
                f"<{base.stop_util_pct:g}% for {base.stop_seconds:g}s"
            )
            for t in r.transitions:
                when = iso_utc_ms(t.at)
                console.print(f"{when}  {t.from_state.value:>7} → {t.to_state.value:<7} {t.reason}")
            ratio = r.capture_ratio
            console.print(
                f"telemetry would run {len(r.telemetry_spans)} time(s), {r.recorded_s:.0f} s in "
                f"all; busy {r.busy_s:.0f} s, captured {r.captured_busy_s:.0f} s"
                + (f" ({ratio * 100:.1f} %)" if ratio is not None else "")
            )
            return
        table = Table(title="threshold sweep", title_justify="left")
        for col in (
            "start %",
            "start s",
            "stop %",
            "stop s",
            "starts",
            "recorded s",
            "captured busy %",
        ):
            table.add_column(col, justify="right")
        for r in results:
            th = r.thresholds
            ratio = r.capture_ratio
            table.add_row(
                f"{th.start_util_pct:g}",
                f"{th.start_seconds:g}",
                f"{th.stop_util_pct:g}",
                f"{th.stop_seconds:g}",
                str(len(r.telemetry_spans)),
                f"{r.recorded_s:.0f}",
                "" if ratio is None else f"{ratio * 100:.1f}",
            )
        console.print(table)

    @app.command()
    @settings_options_only("log_dir")
    def plot(
        paths: PathsArg = None,
        output: Annotated[
            Path,
            typer.Option("-o", "--output", metavar="PATH", help="image file (.png, .svg or .pdf)"),
        ] = Path("gputel.png"),
        since: SinceOpt = None,
        until: UntilOpt = None,
        gpu: GpuOpt = None,
        allocation: Annotated[
            str | None,
            typer.Option(
                "--allocation", metavar="ID", help="only this allocation's GPUs, around its span"
            ),
        ] = None,
        *,
        settings: Settings,
    ) -> None:
        """Draw a timeline per GPU: utilization, power, temperature, throttling, allocations."""
        from gputel.analysis.plot import PlotUnavailable
        from gputel.analysis.plot import plot as draw

        if output.suffix.lower() not in (".png", ".svg", ".pdf"):
            fail(f"invalid --output {output}: use a .png, .svg or .pdf file", EXIT_USAGE)
        flt = _filter(since, until, gpu, allocation)
        try:
            n = draw(input_paths(paths, settings), output, flt)
        except (PlotUnavailable, AnalysisUnavailable) as exc:
            fail(str(exc))
        except (CsvReadError, UnknownAllocation) as exc:
            fail(str(exc), EXIT_USAGE)
        except ValueError as exc:
            fail(str(exc))
        print(f"wrote {output} ({n} GPU{'s' if n != 1 else ''})")

    @app.command()
    def export(
        paths: Annotated[
            list[Path],
            typer.Argument(metavar="PATH", help="CSV files or directories (trees of many nodes)"),
        ],
        parquet: Annotated[
            Path,
            typer.Option(
                "--parquet", metavar="PATH", help="output directory of the Parquet dataset"
            ),
        ],
        incremental: Annotated[
            bool,
            typer.Option(
                "--incremental", help="add only the rows not exported yet (safe to rerun)"
            ),
        ] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="replace the dataset in the directory")
        ] = False,
    ) -> None:
        """Every CSV column of every file, as a Hive-partitioned Parquet dataset
        (OUT/<kind>/node=…/date=…, zstd)."""
        from gputel.analysis.export import ExportRefused, Mode, export_parquet

        if incremental and overwrite:
            fail("--incremental and --overwrite exclude each other", EXIT_USAGE)
        mode: Mode = "incremental" if incremental else "overwrite" if overwrite else "new"
        try:
            with _progress("exporting") as progress:
                written = export_parquet(list(paths), parquet, mode, progress=progress)
        except AnalysisUnavailable as exc:
            fail(str(exc), EXIT_FAILURE)
        except (CsvReadError, ExportRefused) as exc:
            fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot write {parquet}: {exc}")
        if not any(written.values()):
            if not incremental:
                fail("no telemetry rows in the given files")
            # A timer's run on a node that recorded nothing new (or nothing yet) is no failure.
            print(f"{parquet}: nothing new to export")
            return
        for kind, rows in written.items():
            if rows:
                noun = "row" if rows == 1 else "rows"
                print(f"wrote {parquet / kind} ({rows:,} {'new ' if incremental else ''}{noun})")


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal (never in a log or a pipe)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    with Progress(
        f"[bold]{what}",
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update
