"""GPU events on record: the Xid table, events.csv, counters (promtool), recent events, capture."""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

from gputel.supervisor import xid as xidmod
from gputel.supervisor.events import (
    COLUMNS,
    EVENT_KINDS,
    EVENT_NAMES,
    EVENTS_FILE,
    CaptureWindow,
    EventCounters,
    EventRecorder,
    EventsLog,
    RecentEvents,
    csv_row,
    describe,
    make_event,
)
from gputel.supervisor.xid import ACTIONS, NODE_ACTIONS, XID_TABLE, XIDS, xid_info

ROOT = Path(__file__).resolve().parent.parent
EVENTS_DOC = ROOT / "docs" / "events.md"
T0 = 1_795_000_000.25  # 2026-11-18T11:06:40.250Z
UUID0 = "GPU-10a1b2c3-0000-0000-0000-000000000000"
UUID1 = "GPU-11a1b2c3-0000-0000-0000-000000000001"

#: Xids an operator of data-centre GPUs meets; each must have a row.
COMMON_XIDS = (13, 31, 32, 38, 43, 45, 48, 61, 62, 63, 64, 68, 69, 74, 79, 92, 94, 95, 109)
NEWER_XIDS = (119, 120, 121, 140, 143, *range(144, 151))


# --- the Xid table -----------------------------------------------------------------------------


def test_table_has_the_common_xids_once_in_order() -> None:
    numbers = [info.xid for info in XIDS]
    assert numbers == sorted(set(numbers))
    assert set(COMMON_XIDS) | set(NEWER_XIDS) <= set(numbers)


@pytest.mark.parametrize("info", XIDS, ids=lambda i: f"xid{i.xid}")
def test_every_row_is_one_clear_line_with_an_action(info: xidmod.XidInfo) -> None:
    assert info.action in ACTIONS and info.action != xidmod.UNKNOWN
    assert info.meaning and info.todo
    assert "\n" not in info.detail and "\r" not in info.detail
    assert len(info.detail) <= 160, info.detail
    assert info.detail.startswith(info.meaning)
    assert f"; {info.action}: " in info.detail


def test_the_faults_that_need_an_operator_are_classed_so() -> None:
    for number in (48, 64, 79, 95, 140, 143):
        assert xid_info(number).action == xidmod.DRAIN, number
    for number in (63, 74, 94, 119, 120):
        assert xid_info(number).action in NODE_ACTIONS, number
    for number in (13, 31, 43, 45):
        assert xid_info(number).action == xidmod.APP, number
    assert set(xidmod.xids_with_action(*NODE_ACTIONS)) >= {48, 63, 64, 74, 79, 94, 95, 119, 120}


def test_an_unknown_xid_points_to_the_catalog() -> None:
    info = xid_info(4242)
    assert 4242 not in XID_TABLE
    assert info.action == xidmod.UNKNOWN
    assert "4242" in info.detail and xidmod.CATALOG_URL in info.detail


# --- the event ---------------------------------------------------------------------------------


def test_an_xid_event_carries_the_table_detail_and_action() -> None:
    e = make_event(T0, 0, UUID0, "xid", 79, allocations=["job-1", "slurm-42"])
    assert e.detail == XID_TABLE[79].detail
    assert e.action == xidmod.DRAIN
    assert describe(e) == "Xid 79 on GPU 0"
    assert e.as_status() == {
        "timestamp": "2026-11-18T11:06:40.250Z",
        "gpu": 0,
        "uuid": UUID0,
        "event": "xid",
        "xid": 79,
        "action": "drain",
        "allocations": ["job-1", "slurm-42"],
        "source": "",
    }


def test_the_detail_names_the_source_and_the_kernel_line() -> None:
    line = (
        "kernel: NVRM: Xid (PCI:0000:3b:00): 79, pid=42, name=python, GPU has fallen off the bus."
    )
    e = make_event(T0, 0, UUID0, "xid", 79, source="kmsg", note=line)
    assert e.detail == f"{XID_TABLE[79].detail}; source=kmsg; {line}"
    assert e.as_status()["source"] == "kmsg"
    assert make_event(T0, 0, UUID0, "xid", 79, source="nvml").detail.endswith("; source=nvml")


def test_a_fault_on_no_selected_gpu_has_empty_cells_and_labels() -> None:
    sxid = make_event(T0, None, None, "sxid_fatal", source="kmsg")
    other = make_event(T0, None, None, "xid", 79, source="kmsg")
    assert sxid.action == xidmod.DRAIN and make_event(T0, None, None, "sxid").action == "watch"
    assert describe(sxid) == "sxid_fatal on an NVSwitch"
    assert describe(other) == "Xid 79 on an unknown GPU"
    assert csv_row(sxid).split(",")[1:5] == ["", "", "sxid_fatal", ""]
    assert sxid.as_status()["gpu"] is None
    c = EventCounters()
    for e in (other, make_event(T0, 1, UUID1, "xid", 79), sxid):
        c.add(e)
    text = c.exposition().decode()
    assert text.index('gpu="1"') < text.index('gpu=""')
    assert 'gputel_gpu_events_total{event="sxid_fatal",gpu="",uuid=""} 1.0' in text


@pytest.mark.parametrize("kind", EVENT_KINDS[1:], ids=lambda k: k.name)
def test_other_events_have_no_xid_and_their_own_detail(kind: object) -> None:
    name = kind.name  # type: ignore[attr-defined]
    e = make_event(T0, 1, UUID1, name)
    assert e.xid is None
    assert e.detail == kind.detail  # type: ignore[attr-defined]
    assert e.action in ACTIONS
    assert describe(e) == f"{name} on GPU 1"


def test_event_names_and_xid_must_agree() -> None:
    with pytest.raises(ValueError, match="unknown GPU event"):
        make_event(T0, 0, UUID0, "xid_error", 79)
    with pytest.raises(ValueError, match="Xid number"):
        make_event(T0, 0, UUID0, "xid")
    with pytest.raises(ValueError, match="Xid number"):
        make_event(T0, 0, UUID0, "ecc_dbe", 48)
    assert {"xid", "ecc_sbe", "ecc_dbe", "dram_retirement", "gpu_unavailable"} <= set(EVENT_NAMES)


# --- events.csv --------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def test_rows_have_the_contract_columns_and_a_header_once(tmp_path: Path) -> None:
    log = EventsLog(tmp_path)
    assert log.append(make_event(T0, 0, UUID0, "xid", 79, ["job-1", "job-2"]))
    assert log.append(make_event(T0 + 1.5, 1, None, "ecc_dbe"))
    text = (tmp_path / EVENTS_FILE).read_text()
    assert text.splitlines()[0] == "timestamp,gpu,uuid,event,xid,detail,allocations"
    assert text.count("timestamp,") == 1
    assert len(text.splitlines()) == 3
    rows = read_rows(tmp_path / EVENTS_FILE)
    assert list(rows[0]) == list(COLUMNS)
    assert rows[0] == {
        "timestamp": "2026-11-18T11:06:40.250Z",
        "gpu": "0",
        "uuid": UUID0,
        "event": "xid",
        "xid": "79",
        "detail": XID_TABLE[79].detail,
        "allocations": "job-1;job-2",
    }
    # What the driver did not give is an empty cell, never a made-up value.
    assert rows[1]["uuid"] == "" and rows[1]["xid"] == "" and rows[1]["allocations"] == ""
    assert rows[1]["timestamp"] == "2026-11-18T11:06:41.750Z"


def test_every_row_is_one_line_of_valid_csv() -> None:
    e = make_event(T0, 0, UUID0, "xid", 79)
    row = csv_row(e)
    assert "," in XID_TABLE[79].detail
    assert row.endswith("\n") and row.count("\n") == 1
    assert f',"{XID_TABLE[79].detail}",' in row
    odd = e.__class__(T0, 0, UUID0, "xid", 13, 'a "quoted",\nmulti-line detail', ("j",))
    (parsed,) = list(csv.reader(io.StringIO(csv_row(odd))))
    assert parsed[5] == 'a "quoted", multi-line detail'
    assert parsed[6] == "j"


def test_file_is_0640_and_rotation_starts_a_new_file_with_a_header(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        log = EventsLog(tmp_path)
        log.append(make_event(T0, 0, UUID0, "xid", 48))
    finally:
        os.umask(old_umask)
    path = tmp_path / EVENTS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.rename(tmp_path / "events.csv.1")  # what logrotate does (never copytruncate)
    log.append(make_event(T0 + 1, 0, UUID0, "xid", 48))
    assert [r["xid"] for r in read_rows(path)] == ["48"]
    assert [r["xid"] for r in read_rows(tmp_path / "events.csv.1")] == ["48"]


def test_an_unwritable_log_dir_costs_rows_only_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone"
    rec = EventRecorder(missing)
    with caplog.at_level(logging.INFO, logger="gputel.supervisor.events"):
        rec.record(make_event(T0, 0, UUID0, "xid", 79))
        rec.record(make_event(T0 + 1, 0, UUID0, "xid", 79))
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "GPUTEL_LOG_DIR" in errors[0].getMessage()
    assert rec.log.rows_failed == 2
    # Counted and shown all the same.
    assert rec.counters.xid_counts() == {(0, UUID0, 79): 2}
    assert len(rec.recent.events()) == 2
    missing.mkdir()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gputel.supervisor.events"):
        rec.record(make_event(T0 + 2, 0, UUID0, "xid", 79))
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert len(read_rows(missing / EVENTS_FILE)) == 1


# --- counters and exposition -------------------------------------------------------------------


def test_repeats_count_and_each_gpu_has_its_own_labels() -> None:
    c = EventCounters()
    for _ in range(3):
        c.add(make_event(T0, 0, UUID0, "xid", 79))
    c.add(make_event(T0, 1, UUID1, "xid", 79))
    c.add(make_event(T0, 0, UUID0, "xid", 48))
    c.add(make_event(T0, 0, UUID0, "ecc_dbe"))
    assert c.xid_counts() == {(0, UUID0, 79): 3, (1, UUID1, 79): 1, (0, UUID0, 48): 1}
    assert c.event_counts() == {
        (0, UUID0, "xid"): 4,
        (1, UUID1, "xid"): 1,
        (0, UUID0, "ecc_dbe"): 1,
    }
    text = c.exposition().decode()
    assert f'gputel_gpu_xid_errors_total{{gpu="0",uuid="{UUID0}",xid="79"}} 3.0\n' in text
    assert f'gputel_gpu_xid_errors_total{{gpu="1",uuid="{UUID1}",xid="79"}} 1.0\n' in text
    assert f'gputel_gpu_events_total{{event="ecc_dbe",gpu="0",uuid="{UUID0}"}} 1.0\n' in text
    assert "# TYPE gputel_gpu_xid_errors_total counter\n" in text
    assert "# TYPE gputel_gpu_events_total counter\n" in text


def test_counting_from_several_threads_loses_nothing() -> None:
    c = EventCounters()
    event = make_event(T0, 0, UUID0, "xid", 79)

    def add() -> None:
        for _ in range(2000):
            c.add(event)

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert c.xid_counts() == {(0, UUID0, 79): 8000}


def promtool_check(data: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    res = subprocess.run(
        [promtool, "check", "metrics"], input=data, capture_output=True, timeout=30
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout + res.stderr == b"", res.stdout + res.stderr


def test_exposition_is_promtool_clean_before_and_after_events() -> None:
    c = EventCounters()
    promtool_check(c.exposition())
    c.add(make_event(T0, 0, UUID0, "xid", 79))
    c.add(make_event(T0, 1, None, "gpu_unavailable"))
    c.add(make_event(T0, 1, UUID1, "xid", 4242))
    promtool_check(c.exposition())


# --- recent events and the recorder ------------------------------------------------------------


def test_recent_events_keep_the_newest() -> None:
    ring = RecentEvents(size=3)
    for n in range(5):
        ring.add(make_event(T0 + n, n, None, "ecc_sbe"))
    assert [e["gpu"] for e in ring.as_status()] == [2, 3, 4]


def test_recorder_records_everywhere(tmp_path: Path) -> None:
    rec = EventRecorder(tmp_path)
    rec.record(make_event(T0, 0, UUID0, "xid", 79, ["job-7"]))
    rec.record(make_event(T0 + 2, 0, UUID0, "xid", 79, ["job-7"]))
    assert [r["allocations"] for r in read_rows(tmp_path / EVENTS_FILE)] == ["job-7", "job-7"]
    assert rec.counters.xid_counts() == {(0, UUID0, 79): 2}
    assert [e["xid"] for e in rec.recent.as_status()] == [79, 79]


# --- capture -----------------------------------------------------------------------------------


def test_capture_window_opens_extends_and_ends() -> None:
    w = CaptureWindow(300)
    assert not w.active(0.0)
    assert w.trigger(make_event(T0, 0, UUID0, "xid", 79), now=100.0)
    assert w.reason == "capture after Xid 79 on GPU 0"
    assert w.active(399.9) and w.remaining(300.0) == pytest.approx(100.0)
    assert w.trigger(make_event(T0, 1, UUID1, "ecc_dbe"), now=200.0)
    assert w.reason == "capture after ecc_dbe on GPU 1"
    assert w.active(499.9)
    assert not w.active(500.0) and w.remaining(600.0) == 0.0


def test_capture_zero_is_off() -> None:
    w = CaptureWindow(0)
    assert not w.trigger(make_event(T0, 0, UUID0, "xid", 79), now=1.0)
    assert not w.active(1.0) and w.reason is None


# --- docs ----------------------------------------------------------------------------------------


def test_docs_list_every_xid_with_its_action_and_todo() -> None:
    text = EVENTS_DOC.read_text()
    rows = {
        int(m.group(1)): m.group(0)
        for m in re.finditer(r"^\| (\d+) \|.*$", text, flags=re.MULTILINE)
    }
    assert sorted(rows) == [info.xid for info in XIDS]
    for info in XIDS:
        assert f"| `{info.action}` |" in rows[info.xid], info.xid
        assert info.meaning in rows[info.xid] and info.todo in rows[info.xid], info.xid


def test_docs_name_every_event_and_column() -> None:
    text = EVENTS_DOC.read_text()
    for name in EVENT_NAMES:
        assert f"`{name}`" in text, name
    assert ",".join(COLUMNS) in text
    assert "GPUTEL_EVENT_CAPTURE_SECONDS" in text and "GPUTEL_SIM_EVENTS" in text


# --- alert rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alert", "action"),
    [("GputelGPUFaultNeedsDrain", xidmod.DRAIN), ("GputelGPUFaultNeedsReset", xidmod.RESET)],
)
def test_alert_rules_cover_exactly_the_table_classes(alert: str, action: str) -> None:
    rules = yaml.safe_load((ROOT / "contrib" / "prometheus" / "gputel.rules.yml").read_text())
    (expr,) = [r["expr"] for g in rules["groups"] for r in g["rules"] if r.get("alert") == alert]
    for label, wanted in (
        ("xid", {str(x) for x in xidmod.xids_with_action(action)}),
        ("event", {k.name for k in EVENT_KINDS if k.action == action}),
    ):
        matchers = re.findall(rf'\b{label}=~"([^"]*)"', expr)
        assert matchers, (alert, label)
        for matcher in matchers:
            assert set(matcher.split("|")) == wanted, (alert, label, matcher)
