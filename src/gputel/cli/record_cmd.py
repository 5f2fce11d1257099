"""``gputel record``: the telemetry child, also usable standalone in the foreground."""

import logging
import sys
from typing import Annotated

import typer

from gputel.cli.options import (
    AGENT_DECISIONS,
    EXIT_FAILURE,
    EXIT_USAGE,
    fail,
    settings_options_except,
)
from gputel.settings import Settings, SettingsError, check_for_start


def _setup_logging() -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="gputel record: %(levelname)s: %(message)s",
    )


@settings_options_except(*AGENT_DECISIONS)
def record(
    standalone: Annotated[
        bool,
        typer.Option(
            "--standalone/--child",
            help="standalone: serve /metrics on the exporter address (port 0: no server); "
            "child: run under the agent, publish metrics.prom in the run directory only",
        ),
    ] = True,
    *,
    settings: Settings,
) -> None:
    """Record GPU and host telemetry every tick to CSV and Prometheus until SIGTERM/SIGINT."""
    from gputel.runtime import RunDirError
    from gputel.sources.base import GpuSelectionError, GpuSourceError
    from gputel.telemetry.recorder import run_record

    _setup_logging()
    try:
        check_for_start(settings)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        code = run_record(settings, child=not standalone)
    except GpuSelectionError as exc:
        fail(str(exc), EXIT_USAGE)
    except (GpuSourceError, RunDirError) as exc:
        fail(str(exc), EXIT_FAILURE)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``gputel record`` to ``app``."""
    app.command("record")(record)
