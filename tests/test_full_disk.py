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


@pytest.mark.root
def test_status_and_metrics_show_a_failing_disk(tmp_path: Path) -> None:
    """A full log directory under a running agent: ``gputel status`` (JSON and human) names the
    file, since when and how many rows; ``/metrics`` counts them per file."""
    import json
    import re
    import sys

    from test_agent_e2e import AgentProc, wait_for

    with tiny_tmpfs(tmp_path / "small") as log_dir:
        agent = AgentProc(tmp_path / "a", {"GPUTEL_LOG_DIR": str(log_dir)})
        try:
            filler = fill(log_dir)
            for mode in ("on", "off", "on", "off"):
                assert agent.ask({"op": "set_mode", "mode": mode, "for_s": None})["ok"]

            def failing() -> dict | None:
                for f in agent.status().get("write_failures") or []:
                    if f["file"] == "transitions.csv" and f["failing"] and f["rows_failed"]:
                        return f
                return None

            entry = wait_for(failing, 20, "a failing transitions.csv in status")
            assert entry["since"] and entry["error"]
            env = {**agent.env}
            human = subprocess.run(
                [sys.executable, "-m", "gputel", "status"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert "transitions.csv" in human.stdout and "failing since" in human.stdout, (
                human.stdout
            )
            js = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "gputel", "status", "--json"],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=60,
                ).stdout
            )
            assert any(f["file"] == "transitions.csv" for f in js["write_failures"])
            metrics = agent.metrics()
            m = re.search(
                r'^gputel_file_rows_failed_total\{file="transitions.csv"\} (\S+)$', metrics, re.M
            )
            assert m and float(m.group(1)) >= 1, metrics
            assert re.search(
                r'^gputel_file_write_failing\{file="transitions.csv"\} 1', metrics, re.M
            )
            filler.unlink()
            assert agent.ask({"op": "set_mode", "mode": "auto", "for_s": None})["ok"]
            wait_for(lambda: not failing(), 20, "writing to recover")
        finally:
            agent.kill()
