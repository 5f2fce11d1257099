"""transitions.csv: header once, one whole row per write, failures logged once and survived."""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path

import pytest

from gputel.formats import iso_utc_ms
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog

#: The contract's header of ``transitions.csv``.
HEADER = "timestamp,from_state,to_state,reason\n"


def rec(to: str = "arming", reason: str = "utilization 85% >= 20%") -> TransitionRecord:
    return TransitionRecord(iso_utc_ms(), "idle", to, reason)


def test_header_once_then_rows(tmp_path: Path) -> None:
    log = TransitionsLog(tmp_path)
    assert log.append(rec())
    assert log.append(rec("active", 'a "quoted", reason\nwith newline'))
    text = (tmp_path / "transitions.csv").read_text()
    assert text.startswith(HEADER)
    assert text.count("timestamp,") == 1
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["to_state"] for r in rows] == ["arming", "active"]
    assert rows[1]["reason"] == 'a "quoted", reason with newline'
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rows[0]["timestamp"])


def test_rotated_file_gets_a_new_header(tmp_path: Path) -> None:
    log = TransitionsLog(tmp_path)
    log.append(rec())
    os.rename(tmp_path / "transitions.csv", tmp_path / "transitions.csv.1")
    log.append(rec("active"))
    assert (tmp_path / "transitions.csv").read_text().startswith(HEADER)


def test_existing_file_is_appended_without_second_header(tmp_path: Path) -> None:
    TransitionsLog(tmp_path).append(rec())
    TransitionsLog(tmp_path).append(rec("active"))
    assert (tmp_path / "transitions.csv").read_text().count(HEADER) == 1


def test_write_failure_logged_once_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = TransitionsLog(tmp_path / "missing" / "dir")
    for _ in range(3):
        assert not log.append(rec())
    errors = [r for r in caplog.records if "cannot write" in r.getMessage()]
    assert len(errors) == 1
    (tmp_path / "missing" / "dir").mkdir(parents=True)
    assert log.append(rec())


def test_iso_utc_ms_format() -> None:
    assert iso_utc_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc_ms(1.2345) == "1970-01-01T00:00:01.234Z"
