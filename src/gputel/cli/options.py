"""Settings flags shared by every command, generated from the settings table.

Each setting's flag is added to a command's signature by :func:`settings_options`, so a flag and
its environment name can never drift apart. Bad values exit 2 with one line naming the setting.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from gputel.settings import SETTINGS, Settings, SettingsError, load_settings

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one line to stderr and exit; the only place errors become exit codes."""
    print(f"gputel: {message}", file=sys.stderr)
    raise typer.Exit(code)


def settings_or_exit(overrides: dict[str, str | None]) -> Settings:
    try:
        return load_settings(overrides=overrides)
    except SettingsError as exc:
        fail(str(exc), EXIT_USAGE)


def settings_options(func: F) -> F:
    """Add one ``--flag`` per agent setting; the command receives ``settings: Settings``."""
    return _with_settings_options(func, ())


def settings_options_except(*attrs: str) -> Callable[[F], F]:
    """Like :func:`settings_options`, without the flags of ``attrs``.

    For a command whose own option has a setting's flag name (``hook allocate --gpus`` names the
    allocation's GPUs, not ``GPUTEL_GPUS``); the setting is then read from the environment only.
    """

    def decorate(func: F) -> F:
        return _with_settings_options(func, attrs)

    return decorate


def _with_settings_options(func: F, exclude: tuple[str, ...]) -> F:
    specs = [s for s in SETTINGS if s.scope == "agent" and s.attr not in exclude]
    # Resolve postponed (string) annotations against the command's own module, so typer sees
    # the real Annotated[...] metadata on the wrapper.
    sig = inspect.signature(func, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "settings"]
    annotations = {p.name: p.annotation for p in params}
    for spec in specs:
        name = f"opt_{spec.attr}"
        annotation = Annotated[
            str | None,
            typer.Option(
                spec.flag,
                help=f"{spec.help} \\[env {spec.env}, default {spec.default or 'see docs'}]",
                show_default=False,
                rich_help_panel="Settings",
            ),
        ]
        params.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
        )
        annotations[name] = annotation

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {spec.attr: kwargs.pop(f"opt_{spec.attr}", None) for spec in specs}
        kwargs["settings"] = settings_or_exit(overrides)
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = annotations
    return wrapper  # type: ignore[return-value]
