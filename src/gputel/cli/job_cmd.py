"""``gputel job``: what one allocation did, from the recorded files (the ``analysis`` extra)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from gputel.cli.analysis_cmd import PathsArg, input_paths
from gputel.cli.options import EXIT_FAILURE, EXIT_USAGE, fail, settings_options_only
from gputel.settings import Settings

if TYPE_CHECKING:
    from gputel.analysis.job import Job


def register(app: typer.Typer) -> None:
    """Add ``gputel job``."""

    @app.command()
    @settings_options_only("log_dir")
    def job(
        alloc_id: Annotated[
            str, typer.Argument(metavar="ID", help="allocation id, e.g. slurm-123 or k8s-<uid>")
        ],
        paths: PathsArg = None,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
        html: Annotated[
            Path | None,
            typer.Option(
                "--html", metavar="PATH", help="also write a self-contained page to this file"
            ),
        ] = None,
        idle_util: Annotated[
            float,
            typer.Option(
                "--idle-util", metavar="PERCENT", help="a GPU under this utilization % is idle"
            ),
        ] = 5.0,
        *,
        settings: Settings,
    ) -> None:
        """One allocation: when, where, how long, energy, per-GPU activity, processes, events.

        Ends with a verdict (an idle GPU, throttling, stalls, Xids). --html writes the same,
        with the timeline, as one page that needs nothing from the network.
        """
        from gputel.analysis.duck import AnalysisUnavailable
        from gputel.analysis.filter import CsvReadError, UnknownAllocation
        from gputel.analysis.job import build_job

        if not 0 <= idle_util <= 100:
            fail(f"invalid --idle-util {idle_util:g}: use 0 to 100", EXIT_USAGE)
        if html is not None and html.suffix.lower() not in (".html", ".htm"):
            fail(f"invalid --html {html}: use a .html file", EXIT_USAGE)
        where = input_paths(paths, settings)
        try:
            result = build_job(where, alloc_id, idle_util)
        except AnalysisUnavailable as exc:
            fail(str(exc), EXIT_FAILURE)
        except (CsvReadError, UnknownAllocation) as exc:
            fail(str(exc), EXIT_USAGE)
        except OSError as exc:
            fail(f"cannot read: {exc}")
        _merge_slurm(result)
        if html is not None:
            _write_html(result, where, html)
        if as_json:
            json.dump(result.to_dict(), sys.stdout, indent=2)
            print()
            return
        import shutil

        from gputel.analysis.job_text import lines, wrapped

        for line in wrapped(lines(result), shutil.get_terminal_size().columns):
            print(line)
        if html is not None:
            print(f"wrote {html}")


def _merge_slurm(result: Job) -> None:
    """A Slurm job's summary as its epilog stored it in the accounting database (the
    AdminComment's ``gputel=`` token), beside the recorded figures; one bounded ``sacct`` call,
    nothing where Slurm accounting cannot be asked."""
    from gputel.control.slurm_comment import read_slurm_summary, slurm_job_id

    job_id = slurm_job_id(result.id)
    if job_id is None:
        return
    figures = read_slurm_summary(job_id)
    if figures:
        result.merge("slurm", figures)


def _write_html(result: Job, where: list[Path], html: Path) -> None:
    """The page, with the allocation's timeline when it has rows and matplotlib is there."""
    from gputel.analysis.filter import ReportFilter
    from gputel.analysis.job_html import page
    from gputel.analysis.plot import PlotUnavailable, svg

    figure: str | None = None
    if result.per_gpu:
        try:
            figure = svg(where, ReportFilter(allocation=result.id))
        except PlotUnavailable:
            figure = None
    try:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(page(result, figure), encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {html}: {exc}")
