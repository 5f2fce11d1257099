"""Appended files written by an older version: moved aside before the first new row, never
appended to, old rows kept, every file one column count, and the report reads both layouts."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
from pathlib import Path

from gputel.control.allocations import SUMMARY_COLUMNS, SummaryLog
from gputel.formats import RowAppender, moved_aside_name
from gputel.supervisor.events import COLUMNS as EVENT_COLUMNS
from gputel.supervisor.events import EventsLog, make_event
from gputel.supervisor.transitions_log import COLUMNS as TRANSITION_COLUMNS
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog

REPO = Path(__file__).resolve().parent.parent

OLD_ALLOCATIONS = (
    "id,gpus,start,end,duration_s,energy_j\n"
    "job-1,0,2026-11-20T10:00:00.000Z,2026-11-20T10:01:00.000Z,60.000,1000.0\n"
)
OLD_TRANSITIONS = "timestamp,from_state,to_state\n2026-11-20T10:00:00.000Z,idle,arming\n"
OLD_EVENTS = (
    "timestamp,gpu,uuid,event,xid,detail\n2026-11-20T10:00:01.000Z,0,GPU-x,xid,79,off the bus\n"
)


def read_all(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def one_column_count(path: Path) -> int:
    rows = read_all(path)
    counts = {len(r) for r in rows}
    assert len(counts) == 1, f"{path.name}: rows of {sorted(counts)} columns"
    return counts.pop()


def test_old_headers_are_moved_aside_and_new_files_start(tmp_path: Path) -> None:
    (tmp_path / "allocations.csv").write_text(OLD_ALLOCATIONS)
    (tmp_path / "transitions.csv").write_text(OLD_TRANSITIONS)
    (tmp_path / "events.csv").write_text(OLD_EVENTS)

    SummaryLog(tmp_path).append(
        {"id": "job-2", "gpus": [0], "start": "2026-11-21T10:00:00.000Z", "energy_j": 5.0}
    )
    TransitionsLog(tmp_path).append(
        TransitionRecord("2026-11-21T10:00:00.000Z", "idle", "arming", "busy")
    )
    EventsLog(tmp_path).append(make_event(1.8e9, 0, "GPU-x", "xid", 79))

    for name, old, columns in (
        ("allocations", OLD_ALLOCATIONS, SUMMARY_COLUMNS),
        ("transitions", OLD_TRANSITIONS, TRANSITION_COLUMNS),
        ("events", OLD_EVENTS, EVENT_COLUMNS),
    ):
        aside = sorted(tmp_path.glob(f"{name}-pre-*.csv"))
        assert len(aside) == 1, name
        assert aside[0].read_text() == old, "old rows kept, byte for byte"
        new = tmp_path / f"{name}.csv"
        assert read_all(new)[0] == list(columns)
        assert len(read_all(new)) == 2
        assert one_column_count(new) == len(columns)
        one_column_count(aside[0])


def test_a_matching_header_is_appended_to(tmp_path: Path) -> None:
    rows = RowAppender(tmp_path / "x.csv", ("a", "b"), logging.getLogger("t"))
    assert rows.append([1, 2]) and rows.append([3, 4])
    assert (tmp_path / "x.csv").read_text() == "a,b\n1,2\n3,4\n"
    assert not list(tmp_path.glob("x-pre-*"))


def test_aside_names_never_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "events.csv"
    first = moved_aside_name(path)
    first.write_text("x\n")
    second = moved_aside_name(path)
    assert second != first and second.name.startswith("events-pre-")


def test_moved_aside_names_match_the_logrotate_policy_and_the_report() -> None:
    from gputel.analysis.duck import file_kind

    policy = (REPO / "logrotate" / "gputel").read_text()
    for name in ("allocations", "transitions", "events"):
        assert f"/var/log/gputel/{name}-pre-*.csv" in policy
    assert file_kind(Path("events-pre-20261207T024700Z.csv")) == "events"
    assert file_kind(Path("events-pre-20261207T024700Z.csv.1.gz")) == "events"


def test_report_reads_old_and_new_event_layouts(tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text(OLD_EVENTS)
    EventsLog(tmp_path).append(make_event(1795168802.0, 0, "GPU-x", "xid", 48))  # 10:00:02
    (tmp_path / "gpu-20261120T100000Z-n1.csv").write_text(
        "timestamp,gpu,utilization_gpu_pct\n"
        + "".join(f"2026-11-20T10:00:0{s}.000Z,0,50\n" for s in range(5))
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "report", "--json", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [n["events"] for n in report["nodes"]] == [2]


def test_appended_file_names() -> None:
    from gputel.analysis.duck import file_kind

    for good in (
        "allocations.csv",
        "allocations.csv.1",
        "allocations.csv.2.gz",
        "allocations-pre-20261207T024700Z.csv",
        "allocations-pre-20261207T024700Z_001.csv.1.gz",
    ):
        assert file_kind(Path(good)) == "allocations", good
    for bad in ("allocations.json", "allocationsX.csv", "events.csv", "gpu-x.csv"):
        assert file_kind(Path(bad)) != "allocations", bad


def test_gputel_job_reads_an_old_layout_summary_moved_aside(tmp_path: Path) -> None:
    from gputel.analysis.job import summary_rows

    (tmp_path / "allocations.csv").write_text(OLD_ALLOCATIONS)
    SummaryLog(tmp_path).append(
        {"id": "job-1", "gpus": [0], "start": "2026-11-21T10:00:00.000Z", "energy_j": 5.0}
    )
    rows = summary_rows([tmp_path], "job-1")
    assert [r["energy_j"] for r in rows] == ["1000.0", "5"]
