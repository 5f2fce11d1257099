"""``gputel agent``: the supervisor in the foreground (the systemd ``ExecStart``)."""

from __future__ import annotations

import typer

from gputel.cli.options import EXIT_FAILURE, EXIT_USAGE, fail, settings_options
from gputel.settings import Settings, SettingsError, check_for_start


@settings_options
def agent(*, settings: Settings) -> None:
    """Run the supervisor: poll GPUs, start and stop telemetry, serve /metrics and the socket."""
    from gputel.supervisor.agent import AgentConfigError, AgentError, run_agent

    try:
        check_for_start(settings)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        code = run_agent(settings)
    except AgentConfigError as exc:
        fail(str(exc), EXIT_USAGE)
    except AgentError as exc:
        fail(str(exc), EXIT_FAILURE)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``gputel agent`` to ``app``."""
    app.command("agent")(agent)
