"""Every text cell a user can influence is neutralised against spreadsheet formulas (OWASP: a
leading ``'``), in every CSV gputel writes, and reads back to the original by dropping it."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from pathlib import Path

import pytest

from gputel.formats import csv_cell, original_text, safe_text
from gputel.schema import GpuReading, HostReading, ProcessRecord, Sample, SourceStatus
from gputel.supervisor.events import EventsLog, make_event
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog
from gputel.telemetry.csv_sink import CsvSink

HOSTILE = [
    '=HYPERLINK("http://x","click")',
    "+cmd|' /C calc'!A0",
    "-2+3",
    "@SUM(1+1)",
    "\t=1+1",
    "\r=1+1",
    "'=already quoted",
]
LIVE = tuple("=+-@\t\r")


@pytest.mark.parametrize("text", HOSTILE)
def test_cell_rule_neutralises_and_reads_back(text: str) -> None:
    cell = safe_text(text)
    assert cell.startswith("'")
    assert original_text(cell) == text
    assert original_text(safe_text("plain")) == "plain" == safe_text("plain")
    assert not csv_cell(text).lstrip('"').startswith(LIVE)


def test_plain_numbers_stay_numbers() -> None:
    for number in ("-3.5", "+2", "-1e3", "-0"):
        assert safe_text(number) == number == csv_cell(number)


def test_process_rows_neutralise_user_command_and_job(tmp_path: Path) -> None:
    t = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)
    procs = [
        ProcessRecord(0, 100 + i, f"@u{i}", cmd, "-job", 1.0, 2.0) for i, cmd in enumerate(HOSTILE)
    ]
    sample = Sample(
        t,
        0.0,
        [GpuReading(0, "GPU-0", "=name", utilization_gpu_pct=1.0)],
        HostReading(),
        [SourceStatus("sim", True, 0.0)],
        processes=procs,
    )
    sink = CsvSink(tmp_path, host="n")
    sink.write(sample)
    sink.close()
    for name in ("processes-*.csv", "gpu-*.csv"):
        (path,) = tmp_path.glob(name)
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
        for row in rows[1:]:
            for cell in row:
                assert not cell.startswith(LIVE), (name, row)
    (path,) = tmp_path.glob("processes-*.csv")
    with open(path, newline="") as fh:
        commands = [original_text(r["command"]) for r in csv.DictReader(fh)]
    # One physical line per row: a CR inside a value becomes a space.
    assert commands == [c.replace("\r", " ") for c in HOSTILE]


def test_agent_files_neutralise_details_and_reasons(tmp_path: Path) -> None:
    TransitionsLog(tmp_path).append(TransitionRecord("2026-11-22T00:00:00.000Z", "a", "b", "=1+1"))
    event = make_event(1.8e9, 0, "-GPU", "xid", 79, allocations=["@x"])
    EventsLog(tmp_path).append(event)
    for name in ("transitions.csv", "events.csv"):
        with open(tmp_path / name, newline="") as fh:
            for row in list(csv.reader(fh))[1:]:
                assert not any(c.startswith(LIVE) for c in row), row
