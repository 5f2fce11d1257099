"""The runtime directory shared by the agent, its recorder child, the CLI and the hooks.

Files (all written atomically: a temporary file in the same directory, then ``rename``; the
rule lives in ``gputel.formats``):

- ``control.sock``      the agent's control socket (0660)
- ``agent.lock``        flock held by the running agent: one agent per run directory
- ``allocations.json``  open allocations, written by the agent, read by the recorder to tag rows
- ``recorder.json``     the recorder's heartbeat and state, rewritten every tick
- ``metrics.prom``      the recorder's latest exposition bytes, rewritten every tick
- ``pretrigger.json``   the agent's pre-trigger readings at a session's start, taken (read and
                        removed) by the recorder child before its first tick

The directory is created 0750 (0700 under ``/tmp``) and must be owned by us; a directory that
someone else owns or that is a symlink is refused, so nobody can plant a socket or state file.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from gputel.formats import atomic_write_bytes

CONTROL_SOCKET = "control.sock"
AGENT_LOCK = "agent.lock"
ALLOCATIONS_FILE = "allocations.json"
RECORDER_STATE_FILE = "recorder.json"
METRICS_FILE = "metrics.prom"
PRETRIGGER_FILE = "pretrigger.json"

#: Internal environment variable: the agent's sim timeline epoch (a CLOCK_MONOTONIC value, which
#: is system-wide on Linux) so a child recorder sees the same moment of the pattern as the agent.
SIM_EPOCH_ENV = "_GPUTEL_SIM_EPOCH"


class RunDirError(RuntimeError):
    """The runtime directory is unusable; the message says why and what to do."""


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
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        raise RunDirError(
            f"run directory {path} is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})"
        )
    if st.st_mode & stat.S_IWOTH:
        raise RunDirError(f"run directory {path} is world-writable; refusing to use it")
    return path


def atomic_write_json(path: Path, obj: Any, mode: int = 0o640) -> None:
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode(), mode)


def read_json(path: Path) -> Any | None:
    """The parsed file, or None when it is missing or not valid JSON (a reader never crashes)."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return None
