"""Settings flags against a running agent: a flag the agent would not take is refused, never
silently ignored.

``gputel start`` and ``gputel hook allocate`` take every settings flag because they may start an
agent, which then runs with them. An agent that is already running keeps the settings it was
started with: a flag can reach it only by naming what it already has. So a flag that differs
from the agent's own value (its status carries ``settings``, by environment name) is a usage
error, exit 2, before anything is asked of the agent; a flag an agent started here takes is
applied, and the command says so.
"""

from __future__ import annotations

from typing import Any

from gputel.cli.options import EXIT_USAGE, fail
from gputel.settings import SETTINGS_BY_ATTR

#: Flags that say where the agent is, not how it runs: always reach it.
_LOCATION = ("run_dir",)


def describe(flags: dict[str, str]) -> str:
    """``--interval 0.2 --sim-gpus 1``: the flags as given."""
    return " ".join(f"{SETTINGS_BY_ATTR[a].flag} {t}" for a, t in flags.items())


def mismatches(flags: dict[str, str], agent_settings: Any) -> list[str]:
    """``--flag VALUE (agent: OTHER)`` for each flag whose value the running agent does not have.

    A flag is compared by its parsed value (``0.20`` is ``0.2``); an agent that does not report
    a setting (an older version) has it unknown, and the flag is refused too.
    """
    theirs = agent_settings if isinstance(agent_settings, dict) else {}
    out: list[str] = []
    for attr, text in flags.items():
        if attr in _LOCATION:
            continue
        spec = SETTINGS_BY_ATTR[attr]
        other = theirs.get(spec.env)
        if isinstance(other, str) and _same(spec.parse, text, other):
            continue
        shown = "unknown" if not isinstance(other, str) else (other or "empty")
        out.append(f"{spec.flag} {text} (agent: {shown})")
    return out


def _same(parse: Any, ours: str, theirs: str) -> bool:
    try:
        return bool(parse(ours) == parse(theirs))
    except ValueError:
        return False


def refuse_unreachable(flags: dict[str, str], status: dict[str, Any], started: str = "") -> None:
    """Exit 2 with one line when a flag differs from what the agent of ``status`` runs with.

    ``started``: how the agent was just started (it was not started with these settings: a
    systemd unit reads its own environment file).
    """
    wrong = mismatches(flags, status.get("settings"))
    if not wrong:
        return
    pid = status.get("pid")
    who = f"the running agent{f' (pid {pid})' if pid else ''}"
    if started:
        who = f"{started}, but it"
    fail(
        f"{', '.join(wrong)}: {who} keeps its own settings and a flag cannot change them; "
        "drop the flag, or set it where the agent is started (/etc/default/gputel or its "
        "environment) and restart the agent",
        EXIT_USAGE,
    )


def agent_status(run_dir: Any, timeout: float = 2.0) -> dict[str, Any] | None:
    """The running agent's status, or None when no agent is there (any other trouble: exit 1)."""
    from gputel.control.client import request
    from gputel.control.protocol import AgentTimeout, AgentUnavailable, ControlError

    try:
        reply = request(run_dir, {"op": "status"}, timeout=timeout)
    except AgentUnavailable as exc:
        if exc.no_agent:
            return None
        fail(str(exc))
    except AgentTimeout as exc:
        fail(f"{exc}: the agent is running but stuck (see journalctl -u gputel or agent.log)")
    except ControlError as exc:
        fail(str(exc))
    if not reply.get("ok", False):
        fail(f"the agent refused status: {reply.get('error', 'no reason given')}")
    return reply
