"""A full disk mid-row: every file the agent appends to keeps whole rows, counts, recovers.

``allocations.csv``, ``transitions.csv`` and ``events.csv`` are written on a 64 KiB tmpfs that is
filled up while rows are being appended, so a row crosses into a page that cannot be had: the
write is short (or fails), the file is cut back to its last whole row, the loss is counted and
logged once, and rows written once space returns follow whole rows. Needs root for the mount.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gputel.control.allocations import SUMMARY_COLUMNS, AllocationStore
from gputel.supervisor import events as events_mod
from gputel.supervisor import transitions_log
from gputel.supervisor.events import EventsLog, GpuEvent
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog

ENERGY = {0: 0.0, 1: 0.0}


@contextlib.contextmanager
def tiny_tmpfs(path: Path) -> Iterator[Path]:
    path.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Take every free block of the file system; the returned file gives them back."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb", buffering=0) as fh:
        while True:
            fh.write(b"\0" * 4096)
    return filler


def allocations_writer(log_dir: Path, run_dir: Path) -> tuple[Path, Callable[[int], bool]]:
    store = AllocationStore(run_dir, log_dir, [0, 1])

    def write(n: int) -> bool:
        ident = f"job-{n:04d}-" + "x" * 40
        store.allocate(ident, None, None, ENERGY)
        before = store._summaries.rows_failed
        reply = store.release(ident, ENERGY)
        assert reply["released"] is True  # the release itself never fails on a full disk
        return store._summaries.rows_failed == before

    return log_dir / "allocations.csv", write


def transitions_writer(log_dir: Path, run_dir: Path) -> tuple[Path, Callable[[int], bool]]:
    tlog = TransitionsLog(log_dir)

    def write(n: int) -> bool:
        reason = f"row {n:04d}: utilization 85% for 5.0s, with a longer reason to fill pages"
        return tlog.append(
            TransitionRecord(f"2026-11-22T03:45:{n % 60:02d}.000Z", "a", "b", reason)
        )

    return tlog.path, write


def events_writer(log_dir: Path, run_dir: Path) -> tuple[Path, Callable[[int], bool]]:
    elog = EventsLog(log_dir)

    def write(n: int) -> bool:
        event = GpuEvent(1.7e9 + n, 0, "GPU-0", "xid", 79, f"row {n:04d}, fell off the bus", ("j",))
        return elog.append(event)

    return elog.path, write


WRITERS = {
    "allocations.csv": (allocations_writer, "gputel.control.allocations", SUMMARY_COLUMNS),
    "transitions.csv": (transitions_writer, transitions_log.log.name, transitions_log.COLUMNS),
    "events.csv": (events_writer, events_mod.log.name, events_mod.COLUMNS),
}


@pytest.mark.root
@pytest.mark.parametrize("name", list(WRITERS))
def test_full_disk_mid_row_keeps_whole_rows_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    make, logger, columns = WRITERS[name]
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    caplog.set_level(logging.WARNING, logger=logger)
    with tiny_tmpfs(tmp_path / "small") as log_dir:
        path, write = make(log_dir, run_dir)
        written: list[int] = []
        n = 0
        assert write(n)
        written.append(n)
        filler = fill(log_dir)
        failed = 0
        while failed < 3:  # write on until the page holding the file's tail is used up
            n += 1
            assert n < 2000, "the disk never filled"
            if write(n):
                written.append(n)
            else:
                failed += 1
        filler.unlink()
        for _ in range(5):
            n += 1
            assert write(n), "writing did not resume once space returned"
            written.append(n)
        text = path.read_text()
    assert text.endswith("\n")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == list(columns)
    assert all(len(r) == len(columns) for r in rows[1:]), "a torn or glued row"
    assert len(rows) - 1 == len(written)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write" in m for m in messages) == 1, messages
    assert "short write" in messages[0], "the disk did not fill mid-row"
    assert sum("rows lost in total" in m for m in messages) == 1, messages
