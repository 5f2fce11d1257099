"""The ``gputel`` command: builds the typer app from one module per command group.

Only the module of the command being run is imported (all of them for ``--help`` or an unknown
word), so ``gputel status`` and the daemon's ``gputel agent`` do not pay for the analysis, hook
and demo code: start-up time and resident memory both matter on a GPU node.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperGroup

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


class OneLineErrors(TyperGroup):
    """The root command: a usage error is one line on stderr and exit 2, as every other error.

    click's own form (usage, a hint and the message, boxed by rich) is five lines for one
    mistake; scripts and people read the one line that names it.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        from typer import Abort
        from typer._click import exceptions

        def run() -> Any:
            return super(OneLineErrors, self).main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        try:
            code = run()
        except exceptions.NoArgsIsHelpError as exc:
            # A group called bare: its help is the answer (click's exit code for it).
            print(exc.ctx.get_help() if exc.ctx is not None else "", file=sys.stderr)
            sys.exit(exc.exit_code)
        except exceptions.ClickException as exc:
            print(f"gputel: {usage_line(exc)}", file=sys.stderr)
            sys.exit(exc.exit_code)
        except Abort:
            print("gputel: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


def usage_line(exc: Exception) -> str:
    """A click error as one line, with the command's help to look at."""
    from gputel.formats import one_line

    format_message = getattr(exc, "format_message", None)
    text = one_line(format_message() if callable(format_message) else str(exc))
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command_path:
        text += f" (see {ctx.command_path} --help)"
    return text


def build_app(modules: Sequence[str] = ALL_MODULES) -> typer.Typer:
    """A typer app with the commands of ``modules`` registered."""
    from gputel.cli import lazy_coercion, value_kinds

    lazy_coercion.install()
    value_kinds.install()
    app = typer.Typer(
        name="gputel",
        help="GPU node telemetry: per-second GPU and host records while the GPUs are busy.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
        cls=OneLineErrors,
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
    # One program name in usage and errors, however it was started (``python -m gputel``).
    build_app(modules_for(sys.argv[1:]))(prog_name="gputel")


if __name__ == "__main__":
    main()
