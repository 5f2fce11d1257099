"""Fake procfs trees for process-owner tests, built under a test's ``tmp_path``.

The layout mirrors the kernel's: ``<root>/<pid>/{stat,status,cgroup,cmdline,comm,environ}``,
written as the kernel writes them: ``stat`` one line with the command in parentheses and the
start time (clock ticks since boot) in field 22, ``status`` tab-separated ``Key:\\tvalue``
lines with four uids on ``Uid:``, ``cgroup`` one ``ID:CONTROLLERS:PATH`` line per hierarchy,
``cmdline`` and ``environ`` NUL-separated with a trailing NUL.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

#: The flags field of a real kthreadd (``PF_KTHREAD | PF_NOFREEZE | PF_FORKNOEXEC``).
KTHREADD_FLAGS = 2129984
#: The flags field of an ordinary user process.
USER_PROCESS_FLAGS = 4194560


def stat_line(pid: int, comm: str, start_ticks: int, flags: int = USER_PROCESS_FLAGS) -> str:
    # Fields 3..52 after "(comm) ": state, ppid, pgrp, session, tty_nr, tpgid, flags, ...,
    # starttime is field 22.
    fields = ["S", "1", str(pid), str(pid), "0", "-1", str(flags)] + ["0"] * 43
    fields[19] = str(start_ticks)
    return f"{pid} ({comm}) {' '.join(fields)}\n"


def add_process(
    root: Path,
    pid: int,
    *,
    cgroup: str | Iterable[str] = "0::/",
    uid: int | tuple[int, int] = 1000,
    cmdline: Iterable[str] | bytes = ("python", "train.py"),
    comm: str = "python",
    environ: Mapping[str, str] | None = None,
    start_ticks: int = 4_200_000,
) -> Path:
    """``<root>/<pid>`` with its files. ``uid`` is the real uid, or (real, effective)."""
    path = root / str(pid)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    real, effective = uid if isinstance(uid, tuple) else (uid, uid)
    (path / "stat").write_text(stat_line(pid, comm, start_ticks))
    (path / "status").write_text(
        f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{pid}\nNgid:\t0\n"
        f"Pid:\t{pid}\nPPid:\t1\nTracerPid:\t0\n"
        f"Uid:\t{real}\t{effective}\t{effective}\t{effective}\n"
        f"Gid:\t{real}\t{real}\t{real}\t{real}\nFDSize:\t64\nThreads:\t12\n"
    )
    lines = [cgroup] if isinstance(cgroup, str) else list(cgroup)
    (path / "cgroup").write_text("".join(f"{line}\n" for line in lines))
    raw = cmdline if isinstance(cmdline, bytes) else b"".join(a.encode() + b"\0" for a in cmdline)
    (path / "cmdline").write_bytes(raw)
    (path / "comm").write_text(f"{comm}\n")
    env = dict(environ or {"PATH": "/usr/bin", "HOME": "/home/user"})
    (path / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))
    return path


def add_kthreadd(root: Path) -> Path:
    """``<root>/2``: the kernel's kthreadd, present only in the host's PID namespace."""
    path = root / "2"
    path.mkdir(parents=True, exist_ok=True)
    (path / "stat").write_text(stat_line(2, "kthreadd", 0, KTHREADD_FLAGS))
    return path


class _OsProxy:
    """The ``os`` module as a module under test sees it, with ``open`` replaced."""

    def __init__(self, open_: Callable[..., int]) -> None:
        self.open = open_

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def patch_os_open(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, hook: Callable[[str], None]
) -> None:
    """Route ``module``'s ``os.open`` through ``hook(name)`` first (which may raise).

    ``name`` is the path as opened: a ``/proc/PID`` directory or a file name relative to it.
    """

    def guarded_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        hook(os.fspath(path))
        return os.open(path, flags, *args, **kwargs)

    monkeypatch.setattr(module, "os", _OsProxy(guarded_open))
