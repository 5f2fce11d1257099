"""The ``gputel`` command: builds the typer app from one module per command group."""

from __future__ import annotations

import typer

from gputel import __version__
from gputel.cli import (
    agent_cmd,
    analysis_cmd,
    demo_cmd,
    hook_cmd,
    operator_cmd,
    record_cmd,
    status_cmd,
)

app = typer.Typer(
    name="gputel",
    help="GPU node telemetry: per-second GPU and host records while the GPUs are busy.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"gputel {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """GPU node telemetry agent."""


for _module in (agent_cmd, record_cmd, operator_cmd, status_cmd, hook_cmd, demo_cmd, analysis_cmd):
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
