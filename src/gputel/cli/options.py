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


#: The settings a command reads only to reach the agent.
RUN_DIR_ONLY: tuple[str, ...] = ("run_dir",)
#: What ``gputel status`` reads for its own snapshot when no agent runs.
LOCAL_SNAPSHOT: tuple[str, ...] = (
    "run_dir",
    "backend",
    "gpus",
    "sysfs_root",
    "proc_root",
    "sim_gpus",
    "sim_pattern",
    "sim_events",
)
#: The agent's own decisions and sources (activity, events, pre-trigger, the kernel log): no use
#: to a recorder.
AGENT_DECISIONS: tuple[str, ...] = (
    "start_util_pct",
    "start_seconds",
    "stop_util_pct",
    "stop_seconds",
    "activity",
    "event_capture_s",
    "pretrigger_s",
    "kmsg",
)


def settings_options(func: F) -> F:
    """Add one ``--flag`` per agent setting; the command receives ``settings: Settings``.

    For the commands that run or start an agent, which read every setting. A command that takes
    a ``settings_flags`` parameter also receives ``{attr: text}`` of the flags given on its
    command line (to refuse those a running agent would not take).
    """
    return _with_settings_options(func, _agent_attrs(()))


def settings_options_except(*attrs: str) -> Callable[[F], F]:
    """Like :func:`settings_options`, without the flags of ``attrs``.

    For a command whose own option has a setting's flag name (``hook allocate --gpus`` names the
    allocation's GPUs, not ``GPUTEL_GPUS``), or that does not read ``attrs``; the setting is then
    read from the environment only.
    """

    def decorate(func: F) -> F:
        return _with_settings_options(func, _agent_attrs(attrs))

    return decorate


def settings_options_only(*attrs: str) -> Callable[[F], F]:
    """Like :func:`settings_options`, with only the flags of ``attrs``: ``--help`` lists what the
    command reads, and a flag it would ignore is an unknown option (exit 2), never silence.

    The other settings still come from the environment (validated the same way).
    """

    def decorate(func: F) -> F:
        return _with_settings_options(func, attrs)

    return decorate


def _agent_attrs(exclude: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(s.attr for s in SETTINGS if s.scope == "agent" and s.attr not in exclude)


def _with_settings_options(func: F, attrs: tuple[str, ...]) -> F:
    wanted = set(attrs)
    specs = [s for s in SETTINGS if s.scope == "agent" and s.attr in wanted]
    unknown = wanted - {s.attr for s in specs}
    if unknown:
        raise ValueError(f"no such setting: {', '.join(sorted(unknown))}")
    # Resolve postponed (string) annotations against the command's own module, so typer sees
    # the real Annotated[...] metadata on the wrapper.
    sig = inspect.signature(func, eval_str=True)
    wants_flags = "settings_flags" in sig.parameters
    params = [p for p in sig.parameters.values() if p.name not in ("settings", "settings_flags")]
    annotations = {p.name: p.annotation for p in params}
    for spec in specs:
        name = f"opt_{spec.attr}"
        annotation = Annotated[
            str | None,
            typer.Option(
                spec.flag,
                metavar=spec.metavar,
                help=f"{spec.help} [env {spec.env}, default {spec.default or 'see docs'}]",
                show_default=False,
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
        if wants_flags:
            kwargs["settings_flags"] = {k: v for k, v in overrides.items() if v is not None}
        return func(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    wrapper.__annotations__ = annotations
    return wrapper  # type: ignore[return-value]
