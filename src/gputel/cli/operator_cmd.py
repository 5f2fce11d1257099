"""``gputel start | stop | auto``: the operator's override of automatic telemetry.

Each sends one ``set_mode`` to the agent. ``start`` is the one command that also starts an agent
when none runs, since "turn telemetry on" should work on a node where nothing is set up yet;
``stop`` and ``auto`` with no agent have nothing to act on and say so.
"""

from __future__ import annotations

from typing import Any

import typer

from gputel.cli.options import (
    EXIT_USAGE,
    RUN_DIR_ONLY,
    fail,
    settings_options,
    settings_options_only,
)
from gputel.formats import display_time
from gputel.settings import Settings, parse_duration

START_WAIT_S = 5.0
"""How long ``gputel start`` waits for an agent it started (NVML init can take seconds)."""

FOR_HELP = (
    "revert to automatic after this long (e.g. 90s, 15min, 1h30m); default: until `gputel auto`"
)


def parse_for(text: str | None) -> float | None:
    """Seconds of ``--for``, or exit 2 naming the flag."""
    if text is None:
        return None
    try:
        value = parse_duration(text)
    except ValueError as exc:
        fail(f"invalid --for {text!r}: {exc}", EXIT_USAGE)
    if value <= 0:
        fail(f"invalid --for {text!r}: must be > 0", EXIT_USAGE)
    if value > 366 * 86400:
        fail(f"invalid --for {text!r}: must be at most 366 days", EXIT_USAGE)
    return value


def describe_mode(reply: dict[str, Any]) -> str:
    """One human line for a ``set_mode`` reply."""
    mode = reply.get("mode")
    until = display_time(reply.get("until"))
    if mode == "auto":
        line = "automatic: telemetry follows GPU activity and allocations"
    else:
        word = {"on": "on", "off": "off"}.get(str(mode), str(mode))
        tail = f" until {until} (then auto)" if until else " until `gputel auto`"
        line = f"telemetry {word}{tail}"
    active = reply.get("telemetry_active")
    if isinstance(active, bool):
        line += f"; recording now: {'yes' if active else 'no'}"
    return line


def set_mode(
    settings: Settings,
    mode: str,
    for_s: float | None,
    start_agent: bool,
    flags: dict[str, str] | None = None,
) -> str:
    """Ask the agent to change mode; return the lines to print. Exits 1 on any failure.

    ``flags``: the settings flags given (``start``). A running agent must already have their
    values (else exit 2, nothing changed); an agent started here is started with them.
    """
    from gputel.cli.agent_flags import agent_status, describe, refuse_unreachable
    from gputel.control.client import request
    from gputel.control.launch import AgentStartError, ensure_agent
    from gputel.control.protocol import AgentTimeout, AgentUnavailable, ControlError

    message: dict[str, Any] = {"op": "set_mode", "mode": mode, "for_s": for_s}
    lines: list[str] = []
    if flags:
        status = agent_status(settings.run_dir)
        if status is not None:
            refuse_unreachable(flags, status)
    try:
        reply = request(settings.run_dir, message)
    except AgentUnavailable as exc:
        if not exc.no_agent:
            fail(str(exc))
        if not start_agent:
            fail(
                f"agent not running; nothing to {'stop' if mode == 'off' else 'change'} "
                f"(no agent answers on {exc.path})"
            )
        try:
            how = ensure_agent(settings, wait_s=START_WAIT_S)
        except AgentStartError as err:
            fail(str(err))
        if flags:
            status = agent_status(settings.run_dir)
            if status is not None:
                refuse_unreachable(flags, status, started=how)
            how += f"; with {describe(flags)}"
        lines.append(how)
        try:
            reply = request(settings.run_dir, message)
        except ControlError as err:
            fail(f"{how}, but it did not take the request: {err}")
    except AgentTimeout as exc:
        fail(f"{exc}: the agent is running but stuck (see journalctl -u gputel or agent.log)")
    except ControlError as exc:
        fail(str(exc))
    if not reply.get("ok", False):
        fail(f"the agent refused: {reply.get('error', 'no reason given')}")
    lines.append(describe_mode(reply))
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    """Add ``gputel start``, ``stop`` and ``auto`` to ``app``."""

    @app.command("start")
    @settings_options
    def start(
        settings: Settings,
        settings_flags: dict[str, str],
        for_: str | None = typer.Option(None, "--for", metavar="DURATION", help=FOR_HELP),
    ) -> None:
        """Telemetry on now, even when the GPUs are idle (starts the agent if none runs).

        Settings flags configure an agent started here; a running agent keeps its own, and a
        flag that differs from them is refused (exit 2).
        """
        for_s = parse_for(for_)
        print(set_mode(settings, "on", for_s, start_agent=True, flags=settings_flags))

    @app.command("stop")
    @settings_options_only(*RUN_DIR_ONLY)
    def stop(
        settings: Settings,
        for_: str | None = typer.Option(None, "--for", metavar="DURATION", help=FOR_HELP),
    ) -> None:
        """Telemetry off, even when the GPUs are busy or allocated."""
        for_s = parse_for(for_)
        print(set_mode(settings, "off", for_s, start_agent=False))

    @app.command("auto")
    @settings_options_only(*RUN_DIR_ONLY)
    def auto(settings: Settings) -> None:
        """Back to automatic: telemetry follows GPU activity and open allocations."""
        print(set_mode(settings, "auto", None, start_agent=False))
