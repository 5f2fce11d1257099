"""The orchestrator hook API: tell the agent when GPU work is handed out and when it ends.

A GPU manager knows that work is starting seconds before utilization shows it, so with
``GPU_TELEMETRY_AUTOSTART=true`` in its environment it calls :func:`allocation_created` and
:func:`allocation_released`, and telemetry covers every run from its first second.

These calls sit on the orchestrator's critical path, so telemetry must never cost it an
allocation: every call returns a :class:`HookResult` instead of raising, and returns within
:data:`DEADLINE_S` whatever the agent does (down, socket missing, permission denied, accepting
and never answering). The work runs on a thread that the caller waits on with a deadline
(``supervisor/deadline.py``); anything still unfinished is left to that thread or to a detached
helper process. Talking to the agent, and asking again while it is starting or busy, is
``control/hook_client.py``, shared with ``gputel hook``.

The client holds no state beyond the helpers it started, so it is safe from any number of
threads and processes: the agent serialises every change.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gputel.control.allocations import (
    AllocationError,
    read_open_ids,
    validate_gpus,
    validate_id,
    validate_pid,
)
from gputel.formats import error_line
from gputel.settings import AUTOSTART_ENV, Settings, SettingsError, autostart_enabled, load_settings
from gputel.supervisor.deadline import run_with_deadline

log = logging.getLogger(__name__)

#: The promise to callers: a hook call returns within this many seconds.
DEADLINE_S = 2.0
#: How long the caller waits for the worker thread; the rest of DEADLINE_S is left for
#: starting a helper and returning, on a loaded machine.
_WAIT_S = 1.7
#: The worker's own budget for talking to (and starting) the agent.
_WORK_S = 1.5
#: How long a background helper keeps trying to register once it has started the agent.
HELPER_WAIT_S = 30.0


@dataclass(frozen=True)
class HookResult:
    """What a hook call did.

    ``action`` is one of ``registered`` (new allocation), ``already-open``, ``released``,
    ``not-open`` (nothing to release), ``pending`` (agent starting; the registration finishes in
    the background), ``disabled`` (GPU_TELEMETRY_AUTOSTART is not true), or ``failed``.
    """

    ok: bool
    action: str
    detail: str
    summary: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.ok


def _disabled() -> HookResult:
    return HookResult(True, "disabled", f"{AUTOSTART_ENV} is not set to 1/true/yes/on")


def _failed(detail: str) -> HookResult:
    return HookResult(False, "failed", detail)


class _Outcome:
    """Shared between the caller and its worker thread."""

    def __init__(self) -> None:
        #: "agent" while talking to a running agent, "starting" once we asked for one to start.
        self.phase = "agent"
        self.started_how = ""
        #: Set when the caller stopped waiting: the worker then starts nothing new (no agent,
        #: no helper), because the caller already has its answer and acted on it.
        self.abandoned = False


class _Abandoned(Exception):
    """The caller stopped waiting before the worker started an agent."""


# ---------------------------------------------------------------------------------- helpers
_helpers_lock = threading.Lock()
_helpers: dict[str, subprocess.Popen[bytes]] = {}


def _helper_command(ident: str, gpus: list[int] | None, pid: int | None) -> list[str]:
    cmd = [sys.executable, "-m", "gputel", "hook", "allocate", ident]
    if gpus is not None:
        cmd += ["--gpus", ",".join(str(g) for g in gpus)]
    if pid is not None:
        cmd += ["--pid", str(pid)]
    cmd += ["--wait", f"{HELPER_WAIT_S:g}", "--quiet"]
    return cmd


def _start_helper(ident: str, gpus: list[int] | None, pid: int | None) -> str | None:
    """Finish the registration in a detached process, so it survives a short-lived caller.

    Allocation is idempotent in the agent, so a helper racing the worker thread is harmless.
    Returns None on success, else why it could not start.
    """
    with _helpers_lock:
        running = _helpers.get(ident)
        if running is not None and running.poll() is None:
            return None
        try:
            proc = subprocess.Popen(
                _helper_command(ident, gpus, pid),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            return f"cannot start a background helper: {exc}"
        _helpers[ident] = proc
    threading.Thread(target=_reap, args=(ident, proc), daemon=True).start()
    return None


def _reap(ident: str, proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(Exception):
        proc.wait()
    with _helpers_lock:
        if _helpers.get(ident) is proc:
            del _helpers[ident]


def _cancel_helper(ident: str) -> bool:
    """Stop an unfinished background registration of ``ident``; True if one was running.

    Without this a job shorter than the agent's start-up would release before its helper
    registers, leaving an allocation open that nobody closes.
    """
    with _helpers_lock:
        proc = _helpers.pop(ident, None)
    if proc is None or proc.poll() is not None:
        return False
    with contextlib.suppress(OSError):
        proc.terminate()
    with contextlib.suppress(Exception):
        proc.wait(timeout=0.3)
    return True


# ---------------------------------------------------------------------------------- running
def _run_bounded(
    work: Callable[[_Outcome, float], HookResult], on_timeout: Callable[[_Outcome], HookResult]
) -> HookResult:
    """``work`` on a thread of its own, waited for with the hooks' deadline."""
    outcome = _Outcome()
    deadline = time.monotonic() + _WORK_S
    job = run_with_deadline(lambda: work(outcome, deadline), _WAIT_S, name="gputel-hook")
    status, value = job.outcome()
    if status == "ok":
        assert isinstance(value, HookResult)
        return value
    if status == "error":
        log.debug("hook worker failed", exc_info=value)
        return _failed(f"unexpected error: {error_line(value)}")
    outcome.abandoned = True
    return on_timeout(outcome)


def _load() -> Settings:
    return load_settings()


def _reply_error(reply: Any) -> str | None:
    if not isinstance(reply, dict):
        return "the agent sent a malformed reply"
    if reply.get("ok") is not True:
        return str(reply.get("error") or "the agent refused the request")
    return None


# ---------------------------------------------------------------------------------- create
def allocation_created(
    id: str, gpus: list[int] | None = None, pid: int | None = None
) -> HookResult:
    """Register an allocation so telemetry runs while it is open. Never raises.

    ``gpus`` are global GPU indices (None: every GPU the agent watches). ``pid`` is an owner
    process: when it exits the agent closes the allocation itself.
    """
    try:
        result = _allocation_created(id, gpus, pid)
    except Exception as exc:
        result = _failed(f"unexpected error: {error_line(exc)}")
    _log_result("allocation_created", id, result)
    return result


def _allocation_created(id: str, gpus: list[int] | None, pid: int | None) -> HookResult:
    if not autostart_enabled():
        return _disabled()
    try:
        ident = validate_id(id)
        wanted = validate_gpus(gpus)
        owner = validate_pid(pid)
        settings = _load()
    except (AllocationError, SettingsError) as exc:
        return _failed(str(exc))
    message = {"op": "allocate", "id": ident, "gpus": wanted, "pid": owner}

    def on_timeout(outcome: _Outcome) -> HookResult:
        if outcome.phase == "starting":
            return _pending(ident, wanted, owner, outcome.started_how)
        return _failed(f"the gputel agent did not answer within {_WAIT_S:g}s")

    def work(outcome: _Outcome, deadline: float) -> HookResult:
        return _register(settings, message, outcome, deadline)

    return _run_bounded(work, on_timeout)


def _remaining(deadline: float, floor: float = 0.05) -> float:
    return max(floor, deadline - time.monotonic())


def _allocate_result(ident: str, reply: Any) -> HookResult:
    error = _reply_error(reply)
    if error is not None:
        return _failed(error)
    if reply.get("created"):
        return HookResult(True, "registered", f"allocation {ident} registered")
    return HookResult(True, "already-open", f"allocation {ident} was already open")


def _register(
    settings: Settings, message: dict[str, Any], outcome: _Outcome, deadline: float
) -> HookResult:
    """Ask the agent to open the allocation, starting one when none answers.

    An agent that is still coming up when the worker's budget ends is left to a background
    helper (``pending``), which keeps asking for :data:`HELPER_WAIT_S`.
    """
    from gputel.control.hook_client import exchange
    from gputel.control.launch import AgentStartError, ensure_agent
    from gputel.control.protocol import AgentTimeout, ControlError, retryable

    ident = message["id"]

    def start(deadline: float) -> str:
        log.info("no gputel agent answers; starting one")
        # Phase first, then the check: the caller sets abandoned first, then reads the phase,
        # so either it starts the helper or this thread goes on, never neither.
        outcome.phase = "starting"
        if outcome.abandoned:
            raise _Abandoned
        how = ensure_agent(settings, wait_s=_remaining(deadline, 0.1))
        outcome.started_how = how
        return how

    try:
        done = exchange(settings.run_dir, message, deadline, start=start)
    except _Abandoned:
        return _failed("the caller stopped waiting")
    except AgentStartError as exc:
        return _failed(f"no gputel agent is running and none could be started: {exc}")
    except AgentTimeout:
        if outcome.phase != "starting":
            return _failed("the gputel agent accepted the request but did not answer")
        done = None
    except ControlError as exc:
        return _failed(str(exc))
    if done is not None and done.reply is not None and not retryable(done.reply):
        result = _allocate_result(ident, done.reply)
        if result.ok and done.started is not None:
            return HookResult(
                True, result.action, f"{result.detail} (agent started: {done.started})"
            )
        return result
    # The agent is coming up (started by us or by someone else): finish in the background.
    if outcome.abandoned:
        return _failed("the caller stopped waiting")
    return _pending(ident, message["gpus"], message["pid"], outcome.started_how)


def _pending(ident: str, gpus: list[int] | None, pid: int | None, how: str) -> HookResult:
    problem = _start_helper(ident, gpus, pid)
    if problem is not None:
        return _failed(f"the gputel agent is starting but {problem}")
    started = f" ({how})" if how else ""
    return HookResult(
        True,
        "pending",
        f"the gputel agent is starting{started}; allocation {ident} will be registered "
        "once it answers",
    )


# ---------------------------------------------------------------------------------- release
def allocation_released(id: str) -> HookResult:
    """Close an allocation; the result carries its summary (energy, utilization). Never raises."""
    try:
        result = _allocation_released(id)
    except Exception as exc:
        result = _failed(f"unexpected error: {error_line(exc)}")
    _log_result("allocation_released", id, result)
    return result


def _allocation_released(id: str) -> HookResult:
    if not autostart_enabled():
        return _disabled()
    try:
        ident = validate_id(id)
        settings = _load()
    except (AllocationError, SettingsError) as exc:
        return _failed(str(exc))
    cancelled = _cancel_helper(ident)
    message = {"op": "release", "id": ident}

    def on_timeout(outcome: _Outcome) -> HookResult:
        return _failed(f"the gputel agent did not answer within {_WAIT_S:g}s")

    def work(outcome: _Outcome, deadline: float) -> HookResult:
        from gputel.control.hook_client import exchange
        from gputel.control.protocol import AgentTimeout, ControlError

        try:
            done = exchange(settings.run_dir, message, deadline)
        except AgentTimeout:
            return _failed("the gputel agent accepted the request but did not answer")
        except ControlError as exc:
            return _failed(str(exc))
        if done.unavailable is not None:
            return _release_without_agent(settings.run_dir, ident, cancelled, str(done.unavailable))
        reply = done.reply
        error = _reply_error(reply)
        if error is not None:
            return _failed(error)
        assert reply is not None
        if reply.get("released"):
            summary = reply.get("summary")
            return HookResult(
                True,
                "released",
                f"allocation {ident} released",
                summary if isinstance(summary, dict) else None,
            )
        return HookResult(True, "not-open", f"allocation {ident} was not open")

    return _run_bounded(work, on_timeout)


def _release_without_agent(run_dir: Path, ident: str, cancelled: bool, why: str) -> HookResult:
    if cancelled:
        return HookResult(
            True, "not-open", f"allocation {ident} was never registered (its registration stopped)"
        )
    if ident in read_open_ids(run_dir):
        return _failed(
            f"no gputel agent answers ({why}); allocation {ident} is still recorded and will "
            f"be restored when the agent starts: run `gputel hook release {ident}` then"
        )
    return HookResult(True, "not-open", f"no gputel agent is running; {ident} is not open")


# ---------------------------------------------------------------------------------- context
@contextlib.contextmanager
def allocation(
    id: str, gpus: list[int] | None = None, pid: int | None = None
) -> Iterator[HookResult]:
    """Open an allocation for the ``with`` block and close it afterwards, even on error.

    The block's exceptions propagate unchanged; the hooks' never do. Pass ``pid=os.getpid()``
    to have the agent close it should this process be killed inside the block; it is not the
    default because a caller in a container has a pid the agent cannot see.
    """
    result = allocation_created(id, gpus=gpus, pid=pid)
    try:
        yield result
    finally:
        allocation_released(id)


def _log_result(call: str, ident: object, result: HookResult) -> None:
    shown = ident if isinstance(ident, str) and len(ident) <= 128 else repr(ident)[:60]
    if result.ok:
        level = logging.DEBUG if result.action == "disabled" else logging.INFO
        log.log(level, "gputel %s(%s): %s: %s", call, shown, result.action, result.detail)
    else:
        log.warning("gputel %s(%s) failed: %s", call, shown, result.detail)
