"""``gputel hook allocate | release | list``: the hook API for shell callers (Slurm prolog/epilog).

An explicit command needs no ``GPU_TELEMETRY_AUTOSTART``: whoever runs it asked for it. Input is
checked here before the agent is contacted, so a bad id or GPU list exits 2 without side effects;
the agent checks that the GPUs exist, and its refusal exits 2 as well.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import typer

from gputel.cli.options import (
    EXIT_FAILURE,
    EXIT_USAGE,
    RUN_DIR_ONLY,
    fail,
    settings_options_except,
    settings_options_only,
)
from gputel.control.allocations import AllocationError, parse_gpus_text, validate_id
from gputel.formats import human_number
from gputel.settings import Settings

hook_app = typer.Typer(
    name="hook",
    help="Open and close GPU allocations (orchestrators, Slurm prolog/epilog).",
    no_args_is_help=True,
    rich_markup_mode=None,
)

#: How long ``release`` and ``list`` keep asking a busy or starting agent.
ASK_WAIT_S = 3.0


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(hook_app, name="hook")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text)


def _checked_id(ident: str) -> str:
    try:
        return validate_id(ident)
    except AllocationError as exc:
        fail(str(exc), EXIT_USAGE)


def _refused(reply: dict[str, Any], what: str) -> None:
    """Exit on a refusal: 2 for a request to fix, 1 when the agent could not take it now."""
    from gputel.control.protocol import retryable

    if reply.get("ok") is True:
        return
    fail(str(reply.get("error") or what), EXIT_FAILURE if retryable(reply) else EXIT_USAGE)


def _exchange(
    settings: Settings,
    message: dict[str, Any],
    wait_s: float,
    quiet: bool,
    start: bool,
    flags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The agent's reply within ``wait_s`` seconds (see ``control/hook_client.py``), starting
    an agent first when ``start`` and none answers; no agent or no answer → exit 1.

    ``flags``: settings flags given; a running agent must already have their values (else exit
    2 before the request), an agent started here is started with them.
    """
    from gputel.cli.agent_flags import agent_status, describe, refuse_unreachable
    from gputel.control.hook_client import exchange
    from gputel.control.protocol import ControlError

    if flags:
        status = agent_status(settings.run_dir, timeout=max(0.2, min(wait_s, 2.0)))
        if status is not None:
            refuse_unreachable(flags, status)

    def start_agent(deadline: float) -> str:
        from gputel.control.launch import AgentStartError, ensure_agent

        try:
            how = ensure_agent(settings, wait_s=max(0.1, min(deadline - time.monotonic(), 2.0)))
        except AgentStartError as exc:
            fail(f"no gputel agent is running and none could be started: {exc}")
        if flags:
            # A unit started through systemctl reads its own environment file, not our flags.
            status = agent_status(settings.run_dir, timeout=max(0.2, deadline - time.monotonic()))
            if status is not None:
                refuse_unreachable(flags, status, started=how)
            how += f"; with {describe(flags)}"
        if not quiet:
            print(f"gputel: {how}", file=sys.stderr)
        return how

    try:
        done = exchange(
            settings.run_dir,
            message,
            time.monotonic() + wait_s,
            start=start_agent if start else None,
        )
    except ControlError as exc:
        fail(str(exc))
    if done.reply is not None:
        return done.reply
    if done.started is not None:
        fail(f"the gputel agent did not come up within {wait_s:g}s ({done.unavailable})")
    fail(str(done.unavailable))


@hook_app.command("allocate")
@settings_options_except("gpus")
def allocate(
    id: str = typer.Argument(
        ..., metavar="ID", help="allocation id: 1-128 of A-Z a-z 0-9 . _ : @ -"
    ),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        metavar="LIST",
        help="GPU indices of the allocation, e.g. 0,1 (default: all)",
    ),
    pid: int | None = typer.Option(
        None, "--pid", metavar="PID", help="owner process: the allocation closes when it exits"
    ),
    wait: float = typer.Option(
        3.0, "--wait", metavar="SECONDS", help="seconds to wait for a starting agent", hidden=True
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing on success"),
    as_json: bool = typer.Option(False, "--json", help="print the agent's reply"),
    *,
    settings: Settings,
    settings_flags: dict[str, str],
) -> None:
    """Open an allocation: telemetry runs while any allocation is open (starts the agent)."""
    ident = _checked_id(id)
    try:
        wanted = parse_gpus_text(gpus)
    except AllocationError as exc:
        fail(str(exc), EXIT_USAGE)
    if pid is not None and pid <= 0:
        fail(f"--pid {pid} is not a process id", EXIT_USAGE)
    message = {"op": "allocate", "id": ident, "gpus": wanted, "pid": pid}
    reply = _exchange(settings, message, max(0.0, wait), quiet, start=True, flags=settings_flags)
    _refused(reply, "the agent refused the allocation")
    if as_json:
        print(json.dumps(reply, sort_keys=True))
        return
    alloc = reply.get("allocation") or {}
    shown = alloc.get("gpus")
    where = "all GPUs" if shown is None else "GPUs " + ",".join(str(g) for g in shown)
    verb = "opened" if reply.get("created") else "already open:"
    _say(quiet, f"allocation {verb} {ident} ({where})")


@hook_app.command("release")
@settings_options_only(*RUN_DIR_ONLY)
def release(
    id: str = typer.Argument(..., metavar="ID", help="allocation id"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="print nothing on success"),
    as_json: bool = typer.Option(False, "--json", help="print the agent's reply"),
    slurm_comment: bool = typer.Option(
        False,
        "--slurm-comment",
        help="also store the summary in the Slurm job's AdminComment (id slurm-<jobid>; "
        "the Slurm epilog)",
    ),
    *,
    settings: Settings,
) -> None:
    """Close an allocation and print its summary (duration, energy, utilization)."""
    ident = _checked_id(id)
    job_id = None
    if slurm_comment:
        from gputel.control.slurm_comment import slurm_job_id

        job_id = slurm_job_id(ident)
        if job_id is None:
            fail(f"--slurm-comment needs an id slurm-<jobid>, not {ident!r}", EXIT_USAGE)
    reply = _exchange(settings, {"op": "release", "id": ident}, ASK_WAIT_S, quiet, start=False)
    _refused(reply, "the agent refused the release")
    if job_id is not None:
        _store_in_slurm(job_id, reply)
    if as_json:
        print(json.dumps(reply, sort_keys=True))
        return
    summary = reply.get("summary")
    if not reply.get("released") or not isinstance(summary, dict):
        _say(quiet, f"allocation {ident} was not open")
        return
    _say(quiet, format_summary(summary))


def _store_in_slurm(job_id: str, reply: dict[str, Any]) -> None:
    """One line on stderr saying whether the summary reached Slurm; never a failure: the job's
    record is a convenience, and an epilog must not fail over it."""
    from gputel.control.slurm_comment import store_summary

    summary = reply.get("summary")
    if not reply.get("released") or not isinstance(summary, dict):
        print(
            f"gputel: nothing stored in Slurm for job {job_id}: no open allocation", file=sys.stderr
        )
        return
    print(f"gputel: {store_summary(job_id, summary).line}", file=sys.stderr)


def format_summary(summary: dict[str, Any]) -> str:
    gpus = summary.get("gpus") or []
    lines = [
        f"released {summary.get('id')}",
        f"  gpus         {','.join(str(g) for g in gpus) or 'none'}",
        f"  start        {summary.get('start')}",
        f"  end          {summary.get('end')}",
        f"  duration     {human_number(summary.get('duration_s'), 1, ' s')}",
        f"  energy       {human_number(summary.get('energy_j'), 1, ' J')}",
        f"  utilization  mean {human_number(summary.get('util_mean_pct'), 1, ' %')}, "
        f"max {human_number(summary.get('util_max_pct'), 1, ' %')}",
        f"  temperature  max {human_number(summary.get('temperature_max_c'), 1, ' °C')}",
        f"  memory       max {human_number(summary.get('memory_max_mib'), 0, ' MiB')}",
        f"  SM activity  mean {human_number(summary.get('sm_active_mean_pct'), 1, ' %')}",
        f"  throttled    {human_number(summary.get('throttled_s'), 1, ' s')}",
        f"  Xids         {','.join(str(x) for x in summary.get('xids') or []) or 'none'}",
    ]
    reason = summary.get("release_reason")
    if reason and reason != "released":
        lines.append(f"  reason       {reason}")
    return "\n".join(lines)


@hook_app.command("list")
@settings_options_only(*RUN_DIR_ONLY)
def list_(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    *,
    settings: Settings,
) -> None:
    """List the open allocations."""
    reply = _exchange(settings, {"op": "list"}, ASK_WAIT_S, quiet=True, start=False)
    if reply.get("ok") is not True:
        fail(str(reply.get("error") or "the agent refused the request"))
    allocations = reply.get("allocations")
    if not isinstance(allocations, list):
        allocations = []
    if as_json:
        print(json.dumps({"allocations": allocations}, sort_keys=True))
        return
    if not allocations:
        print("no open allocations")
        return
    print(f"{'ID':<40} {'GPUS':<12} {'PID':<8} START")
    for a in allocations:
        if not isinstance(a, dict):
            continue
        g = a.get("gpus")
        gpus = "all" if g is None else ",".join(str(x) for x in g)
        pid = a.get("pid")
        print(f"{a.get('id')!s:<40} {gpus:<12} {'' if pid is None else pid!s:<8} {a.get('start')}")
