"""``gputel demo``: a full idle → busy → idle cycle of the real agent on simulated GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gputel.cli.options import EXIT_FAILURE, EXIT_OK, EXIT_USAGE


def demo(
    keep: Annotated[
        bool,
        typer.Option(
            "--keep/--no-keep",
            help="keep the temporary directory with the CSV files (default) or remove it",
        ),
    ] = True,
    seconds: Annotated[
        float,
        typer.Option(
            "--seconds",
            metavar="SECONDS",
            min=5.0,
            max=600.0,
            help="give up after this many seconds",
        ),
    ] = 40.0,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            metavar="PATH",
            help="use this directory instead of a new temporary one",
            show_default=False,
        ),
    ] = None,
    pattern: Annotated[
        str | None,
        typer.Option(
            "--pattern",
            metavar="PATTERN",
            help="simulated utilization timeline, as GPUTEL_SIM_PATTERN",
            show_default=False,
        ),
    ] = None,
    interval: Annotated[
        float | None,
        typer.Option(
            "--interval",
            metavar="SECONDS",
            min=0.05,
            max=5.0,
            help="seconds between ticks",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the agent on 2 simulated GPUs (no root, no GPU) through one idle → busy → idle cycle.

    Shows the live state (power and a utilization sparkline per GPU), then stops the agent,
    prints the session summary from the report code, writes a plot and says where the files are.
    """
    from gputel.cli.demo import DEMO_INTERVAL_S, DEMO_PATTERN, run_demo
    from gputel.cli.options import fail
    from gputel.sources.simpattern import PatternError, parse_pattern

    if pattern is not None:
        try:
            parse_pattern(pattern)
        except PatternError as exc:
            fail(f"invalid --pattern: {exc}", EXIT_USAGE)
    result = run_demo(
        keep=keep,
        max_seconds=seconds,
        directory=directory,
        pattern=pattern or DEMO_PATTERN,
        interval_s=interval or DEMO_INTERVAL_S,
    )
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILURE)


def register(app: typer.Typer) -> None:
    """Add ``gputel demo`` to ``app``."""
    app.command("demo")(demo)
