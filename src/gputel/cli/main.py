"""The ``gputel`` command: builds the typer app from one module per command group.

Only the module of the command being run is imported (all of them for ``--help`` or an unknown
word), so ``gputel status`` and the daemon's ``gputel agent`` do not pay for the analysis, hook
and demo code: start-up time and resident memory both matter on a GPU node.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

import typer

from gputel import __version__

#: Command word -> the module under gputel.cli that registers it.
COMMAND_MODULES: dict[str, str] = {
    "agent": "agent_cmd",
    "record": "record_cmd",
    "start": "operator_cmd",
    "stop": "operator_cmd",
    "auto": "operator_cmd",
    "status": "status_cmd",
    "hook": "hook_cmd",
    "demo": "demo_cmd",
    "report": "analysis_cmd",
    "replay": "analysis_cmd",
    "plot": "analysis_cmd",
    "job": "job_cmd",
    "export": "analysis_cmd",
}
ALL_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMAND_MODULES.values()))


def _version(value: bool) -> None:
    if value:
        print(f"gputel {__version__}")
        raise typer.Exit(0)


def build_app(modules: Sequence[str] = ALL_MODULES) -> typer.Typer:
    """A typer app with the commands of ``modules`` registered."""
    from gputel.cli import lazy_coercion

    lazy_coercion.install()
    app = typer.Typer(
        name="gputel",
        help="GPU node telemetry: per-second GPU and host records while the GPUs are busy.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    # A callback keeps the app a command group even when a single command is registered.
    @app.callback()
    def _root(
        version: bool = typer.Option(
            False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ) -> None:
        """GPU node telemetry agent."""

    for name in modules:
        importlib.import_module(f"gputel.cli.{name}").register(app)
    return app


def modules_for(argv: Sequence[str]) -> tuple[str, ...]:
    """The modules a command line needs: the first word's, or all of them."""
    for word in argv:
        if word in ("--help", "-h"):
            return ALL_MODULES  # help before any command word lists every command
        if word.startswith("-"):
            continue
        module = COMMAND_MODULES.get(word)
        return (module,) if module else ALL_MODULES
    return ALL_MODULES


def __getattr__(name: str) -> typer.Typer:
    """``gputel.cli.main.app``: the full app, built on first use (tests, documentation)."""
    if name == "app":
        app = build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


def main() -> None:
    build_app(modules_for(sys.argv[1:]))()


if __name__ == "__main__":
    main()
