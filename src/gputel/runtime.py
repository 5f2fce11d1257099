"""The runtime directory shared by the agent, its recorder child, the CLI and the hooks.

Files (all written atomically: a temporary file in the same directory, then ``rename``; the
rule lives in ``gputel.formats``):

- ``control.sock``      the agent's control socket (0660)
- ``agent.lock``        flock held by the running agent: one agent per run directory
- ``recorder.lock``     flock held by the running recorder child: a new child stops an old one
                        (an orphan of a killed agent) before its first row, never overlaps it
- ``allocations.json``  open allocations, written by the agent, read by the recorder to tag rows
- ``recorder.json``     the recorder's heartbeat and state, rewritten when it publishes: every
                        tick, or about once per ``PUBLISH_EVERY_S`` at shorter intervals
                        (:func:`publish_period`)
- ``metrics.prom``      the recorder's latest exposition bytes, rewritten with ``recorder.json``
- ``pretrigger.json``   the agent's pre-trigger readings at a session's start, taken (read and
                        removed) by the recorder child before its first tick

The directory is created 0750 (0700 under ``/tmp``) and must be owned by our effective user,
root included, and writable by nobody else; a directory that someone else owns, that others may
write or that is a symlink is refused, so nobody can plant a socket, a state file or a symlink
in it. Every file in it is opened without following a symlink (:func:`open_file`), and the lock
is created with ``O_EXCL`` when it is new: a root agent never writes through a planted link.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gputel.formats import atomic_write_bytes

CONTROL_SOCKET = "control.sock"
AGENT_LOCK = "agent.lock"
RECORDER_LOCK = "recorder.lock"
ALLOCATIONS_FILE = "allocations.json"
RECORDER_STATE_FILE = "recorder.json"
METRICS_FILE = "metrics.prom"
PRETRIGGER_FILE = "pretrigger.json"

#: The shortest time between two rewrites of ``recorder.json`` and ``metrics.prom``. Their
#: readers (``gputel status``, a Prometheus scrape, the agent's heartbeat check) look at most
#: every second or so; at sub-second intervals rewriting them every tick cost a quarter of the
#: recorder's CPU for nobody (docs/performance.md). An allocation's end, a change of the open
#: allocations and the recorder's own stop still publish at once.
PUBLISH_EVERY_S = 1.0


def publish_period(interval_s: float) -> float:
    """Seconds between two publications of the recorder's state: every tick at intervals of
    ``PUBLISH_EVERY_S`` or more, else about every ``PUBLISH_EVERY_S``."""
    return max(interval_s, PUBLISH_EVERY_S)


#: Internal environment variable: the agent's sim timeline epoch (a CLOCK_MONOTONIC value, which
#: is system-wide on Linux) so a child recorder sees the same moment of the pattern as the agent.
SIM_EPOCH_ENV = "_GPUTEL_SIM_EPOCH"


class RunDirError(RuntimeError):
    """The runtime directory is unusable; the message says why and what to do."""


class LockHeld(RunDirError):
    """Another agent holds ``agent.lock``; ``holder`` is its pid when it wrote one."""

    def __init__(self, message: str, holder: int | None) -> None:
        super().__init__(message)
        self.holder = holder


def open_file(path: Path | str, flags: int, mode: int = 0o640) -> int:
    """``os.open`` for a file in the run directory: never through a symlink, close-on-exec."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def ensure_run_dir(path: Path) -> Path:
    """Create ``path`` if missing and check that it is safe to put a socket in."""
    mode = 0o700 if str(path).startswith("/tmp/") else 0o750
    try:
        path.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot create run directory {path}: {exc.strerror}") from None
    try:
        st = path.lstat()
    except OSError as exc:
        raise RunDirError(f"cannot inspect run directory {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise RunDirError(f"run directory {path} is not a plain directory")
    if st.st_uid != os.geteuid():
        raise RunDirError(
            f"run directory {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()}); "
            "use a directory of our own (GPUTEL_RUN_DIR)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RunDirError(
            f"run directory {path} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"refusing to use it: chmod go-w {path}"
        )
    return path


def _open_lock(path: Path) -> int:
    """A lock file opened for writing our pid into: created with ``O_EXCL`` when new; an
    existing one opened without following a symlink, and only a plain file of ours with one
    link, so the pid never lands in a file someone pointed the lock at."""
    try:
        fd = open_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        try:
            fd = open_file(path, os.O_RDWR)
        except OSError as exc:
            raise RunDirError(
                f"cannot open {path} ({exc.strerror}); a symlink or other odd file is there: "
                "remove it"
            ) from None
    except OSError as exc:
        raise RunDirError(f"cannot create {path}: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
        os.close(fd)
        raise RunDirError(f"{path} is not a plain file of our own; remove it")
    return fd


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _is_recorder(pid: int) -> bool:
    """Whether ``pid`` runs ``gputel record``: a pid read from the lock is signalled only then,
    never a process that reused the number of a holder that just exited."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = fh.read().split(b"\0")
    except OSError:
        return False
    # ``python -m gputel record`` or an installed ``/usr/bin/gputel record``.
    names = [os.path.basename(a) for a in argv]
    return b"gputel" in names and b"record" in argv


#: How long an old recorder gets to stop after SIGTERM before it is killed.
RECORDER_STOP_S = 3.0


def take_recorder_lock(
    run_dir: Path,
    stop_s: float = RECORDER_STOP_S,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Hold ``recorder.lock``; the open descriptor (the lock goes with the process).

    A live holder is an older child (of an agent that was SIGKILLed, say) still writing: it is
    asked to stop (SIGTERM), killed after ``stop_s``, and waited for, so two recorders never
    write the same files at once. RunDirError when it cannot be taken even so.
    """
    path = run_dir / RECORDER_LOCK
    fd = _open_lock(path)
    start = clock()
    signalled: set[tuple[int, int]] = set()
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            pass
        waited = clock() - start
        holder = _holder(fd)
        sig = signal.SIGTERM if waited < stop_s else signal.SIGKILL
        if (
            holder is not None
            and holder != os.getpid()
            and (holder, sig) not in signalled
            and _is_recorder(holder)
        ):
            signalled.add((holder, sig))
            with contextlib.suppress(OSError):
                os.kill(holder, sig)
        if waited > stop_s + 5.0:
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "another process"
            raise RunDirError(f"{path} is held by {who}, which does not stop; stop it first")
        sleep(0.02)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def take_agent_lock(run_dir: Path) -> int:
    """Hold ``agent.lock`` (one agent per run directory) and write our pid; the open descriptor.

    Created with ``O_EXCL`` when new; an existing one is opened without following a symlink
    and must be a plain file with one link, so the pid never lands in a file someone pointed
    the lock at.
    """
    path = run_dir / AGENT_LOCK
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        os.close(fd)
        holder = int(text) if text.isdigit() else None
        who = f" (pid {holder})" if holder is not None else ""
        raise LockHeld(
            f"another gputel agent{who} is already running with run directory {run_dir} "
            f"(it holds {path}); stop it first or use another GPUTEL_RUN_DIR",
            holder,
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def atomic_write_json(path: Path, obj: Any, mode: int = 0o640) -> None:
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode(), mode)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (a reader never crashes)."""
    try:
        with open(open_file(path, os.O_RDONLY), "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None
