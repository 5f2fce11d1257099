"""Starting an agent when none answers: for ``gputel start`` and the orchestrator hooks.

The systemd unit is preferred when it is installed, systemd runs, and it would serve the caller's
run directory; otherwise a detached local agent is started. The local agent is spawned through a
tiny single-threaded launcher that forks and exits, so the agent is re-parented away from the
caller: a long-lived orchestrator never collects a zombie, and forking never happens inside a
caller that may hold threads (CUDA, NCCL).

Every step is bounded in time, because the hooks must return within two seconds.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from gputel.control.client import agent_answers
from gputel.formats import process_alive
from gputel.runtime import RunDirError, ensure_run_dir, open_file
from gputel.settings import Settings

UNIT = "gputel.service"
DEFAULTS_FILE = Path("/etc/default/gputel")
DEFAULT_UNIT_RUN_DIR = Path("/run/gputel")
UNIT_DIRS = (
    Path("/etc/systemd/system"),
    Path("/run/systemd/system"),
    Path("/usr/local/lib/systemd/system"),
    Path("/usr/lib/systemd/system"),
    Path("/lib/systemd/system"),
)
AGENT_LOG = "agent.log"
SYSTEMCTL_TIMEOUT_S = 1.0

#: Variables that belong to the caller's own service manager, never to an agent we start.
_DROP_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")

_LAUNCHER = (
    "import os,sys\n"
    "w=int(sys.argv[1])\n"
    "pid=os.fork()\n"
    "if pid==0:\n"
    "    os.close(w)\n"
    "    os.execv(sys.argv[2],sys.argv[2:])\n"
    "os.write(w,str(pid).encode())\n"
    "os._exit(0)\n"
)


class AgentStartError(RuntimeError):
    """No agent could be started; ``str()`` is one line saying why and what to do."""


def _systemd_running() -> bool:
    return Path("/run/systemd/system").is_dir()


def _unit_installed(timeout: float = SYSTEMCTL_TIMEOUT_S) -> bool:
    if any((d / UNIT).exists() for d in UNIT_DIRS):
        return True
    try:
        done = subprocess.run(
            ["systemctl", "cat", UNIT],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def unit_run_dir(defaults_file: Path = DEFAULTS_FILE) -> Path:
    """The run directory the unit's agent serves: ``GPUTEL_RUN_DIR`` from its EnvironmentFile."""
    try:
        text = defaults_file.read_text()
    except OSError:
        return DEFAULT_UNIT_RUN_DIR
    value = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("export "):
            line = line[len("export ") :].strip()
        if line.startswith("GPUTEL_RUN_DIR="):
            value = line.split("=", 1)[1].strip().strip("'\"")
    return Path(value) if value else DEFAULT_UNIT_RUN_DIR


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _wait_for_agent(run_dir: Path, deadline: float, pid: int | None = None) -> bool:
    while True:
        if agent_answers(run_dir, timeout=max(0.05, min(0.5, deadline - time.monotonic()))):
            return True
        if pid is not None and not process_alive(pid):
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _systemctl_start(timeout: float = SYSTEMCTL_TIMEOUT_S) -> tuple[bool, str]:
    cmd = ["systemctl", "--no-ask-password", "start", "--no-block", UNIT]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, f"systemctl start {UNIT} did not finish within {timeout:g}s"
    except OSError as exc:
        return False, f"cannot run systemctl: {exc.strerror}"
    if done.returncode == 0:
        return True, ""
    lines = (done.stderr or done.stdout or "").strip().splitlines()
    return False, lines[-1] if lines else f"systemctl exited with {done.returncode}"


def _agent_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROP_ENV}
    env.update(settings.to_env())
    return env


def _open_log(run_dir: Path) -> tuple[int, str]:
    path = run_dir / AGENT_LOG
    try:
        return open_file(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND), str(path)
    except OSError:
        return os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC), os.devnull


def _spawn_local(settings: Settings) -> tuple[int | None, str]:
    """Start ``gputel agent`` detached; return its pid (None if unknown) and its log path."""
    try:
        run_dir = ensure_run_dir(settings.run_dir)
    except RunDirError as exc:
        raise AgentStartError(f"cannot start a local agent: {exc}") from None
    log_fd, log_path = _open_log(run_dir)
    r, w = os.pipe()
    try:
        argv = [sys.executable, "-c", _LAUNCHER, str(w), sys.executable, "-m", "gputel", "agent"]
        try:
            launcher = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                pass_fds=(w,),
                close_fds=True,
                start_new_session=True,
                env=_agent_env(settings),
                cwd="/",
            )
        except OSError as exc:
            raise AgentStartError(
                f"cannot start a local agent ({sys.executable}): {exc.strerror}"
            ) from None
        os.close(w)
        w = -1
        try:
            launcher.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
            raise AgentStartError("cannot start a local agent: the launcher hung") from None
        pid_text = b""
        with contextlib.suppress(OSError):
            pid_text = os.read(r, 32)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
        os.close(log_fd)
    if launcher.returncode != 0:
        raise AgentStartError(
            f"cannot start a local agent: launcher exited with {launcher.returncode}"
        )
    pid = int(pid_text) if pid_text.strip().isdigit() else None
    return pid, log_path


def _log_tail(path: str, lines: int = 1) -> str:
    if path == os.devnull:
        return ""
    try:
        with open(open_file(path, os.O_RDONLY), "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 4096))
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    tail = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(tail[-lines:])


def ensure_agent(settings: Settings, wait_s: float = 1.5) -> str:
    """Make sure an agent serves ``settings.run_dir``; return a short phrase saying how.

    Returns within about ``wait_s`` (plus the few milliseconds a spawn takes), every step
    included, because the hooks have a hard time budget. An agent that is started but not yet
    answering is reported in the phrase, not raised (it may still come up). Raises
    :class:`AgentStartError` only when nothing could be started or the agent died at once.
    """
    run_dir = settings.run_dir
    deadline = time.monotonic() + wait_s

    def left(cap: float) -> float:
        return max(0.05, min(cap, deadline - time.monotonic()))

    if agent_answers(run_dir, timeout=left(1.0)):
        return "agent already running"

    systemd_note = ""
    if (
        _systemd_running()
        and _same_dir(run_dir, unit_run_dir())
        and _unit_installed(left(SYSTEMCTL_TIMEOUT_S))
    ):
        ok, why = _systemctl_start(left(SYSTEMCTL_TIMEOUT_S))
        if ok:
            if _wait_for_agent(run_dir, deadline):
                return f"started {UNIT} via systemctl"
            return (
                f"asked systemd to start {UNIT}; not answering after {wait_s:g}s "
                f"(see journalctl -u gputel)"
            )
        if os.geteuid() == 0:
            raise AgentStartError(f"systemctl start {UNIT} failed: {why}")
        systemd_note = f" (systemctl start {UNIT} refused: {why})"

    try:
        pid, log_path = _spawn_local(settings)
    except AgentStartError as exc:
        raise AgentStartError(f"{exc}{systemd_note}") from None
    who = f"pid {pid}" if pid is not None else "pid unknown"
    if _wait_for_agent(run_dir, deadline, pid):
        return f"started a local agent ({who}), log: {log_path}{systemd_note}"
    if pid is not None and not process_alive(pid):
        tail = _log_tail(log_path)
        detail = f": {tail}" if tail else ""
        raise AgentStartError(
            f"the local agent ({who}) exited at once{detail} (log: {log_path}){systemd_note}"
        )
    return (
        f"started a local agent ({who}), not answering after {wait_s:g}s yet, "
        f"log: {log_path}{systemd_note}"
    )
