"""``gputel demo``: a full idle → busy → idle cycle of the real agent on simulated GPUs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gputel.cli.options import EXIT_FAILURE, EXIT_OK


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
        typer.Option("--seconds", min=5.0, max=600.0, help="give up after this many seconds"),
    ] = 40.0,
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir", help="use this directory instead of a new temporary one", show_default=False
        ),
    ] = None,
) -> None:
    """Run the agent on 2 simulated GPUs (no root, no GPU) through one idle → busy → idle cycle.

    Shows the live state, then stops the agent and prints where the CSV files are.
    """
    from gputel.cli.demo import run_demo

    result = run_demo(keep=keep, max_seconds=seconds, directory=directory)
    raise typer.Exit(EXIT_OK if result.ok else EXIT_FAILURE)


def register(app: typer.Typer) -> None:
    """Add ``gputel demo`` to ``app``."""
    app.command("demo")(demo)
