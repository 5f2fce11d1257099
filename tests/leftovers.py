"""The suite leaves nothing running: a session-wide check that fails the run (an error at the
teardown of the last test) when a process the tests started outlives them.

A worker (or a plain run) puts a marker in its environment at the start; every process started
from it inherits the marker, however it was started and whoever its parent is by now (an orphan
of a killed agent is adopted by init). At the end, processes carrying this session's marker and
the worker's own descendants get a grace period to finish exiting; then the rest are listed,
killed and reported. Each pytest-xdist worker (and each pytest a test starts) has its own
marker, so it checks its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator

import psutil
import pytest

#: Not ``GPUTEL_*``: the suite's tests clear those from their environment.
MARK_ENV = "PYTEST_GPUTEL_SESSION"
#: How long a process on its way out (a just-stopped agent) gets before it counts as left over.
GRACE_S = 5.0


def marked_processes(mark: str) -> list[psutil.Process]:
    """Processes with this session's marker or below this process, zombies and us excluded."""
    me = os.getpid()
    found: dict[int, psutil.Process] = {}
    with_mark = f"{MARK_ENV}={mark}".encode()
    for pid in psutil.pids():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if with_mark not in fh.read().split(b"\0"):
                    continue
            found[pid] = psutil.Process(pid)
        except (OSError, psutil.Error):
            continue
    try:
        for child in psutil.Process(me).children(recursive=True):
            found.setdefault(child.pid, child)
    except psutil.Error:
        pass
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def describe(proc: psutil.Process) -> str:
    try:
        return f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}"
    except psutil.Error:
        return f"pid {proc.pid}"


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_running() -> Iterator[None]:
    # Always a mark of our own: a pytest run started by a test (scripts/gpu-check.sh runs
    # `pytest -m gpu`) must check its own processes, never its parent's, which it would kill.
    mark = f"{os.getpid()}-{secrets.token_hex(6)}"
    os.environ[MARK_ENV] = mark
    yield
    deadline = time.monotonic() + GRACE_S
    left = marked_processes(mark)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = marked_processes(mark)
    if not left:
        return
    names = [describe(p) for p in left]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(left, timeout=5)
    pytest.fail(
        f"{len(names)} process(es) started by the tests outlived them (now killed): "
        + "; ".join(names),
        pytrace=False,
    )
