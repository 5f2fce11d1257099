"""The Parquet export's rules: the kinds and their types, growing and rotated files, older
layouts, bad cells, and runs that die half-way."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import duckdb
import pytest

from exportcheck import assert_dataset_equals_csvs, dataset
from gputel.analysis.export import MANIFEST, ExportRefused, export_parquet
from gputel.analysis.filter import CsvReadError
from gputel.filekinds import COLUMN_TYPES, KIND_BY_NAME, KINDS
from gputel.schema import GpuReading, HostReading, MigReading, Sample
from gputel.telemetry.csv_sink import CsvSink

SRC = Path(__file__).resolve().parent.parent / "src" / "gputel"
T0 = datetime(2026, 11, 22, 23, 59, 58, tzinfo=timezone.utc)
TRANSITIONS_HEADER = "timestamp,from_state,to_state,reason\n"


def iso(k: int) -> str:
    t = T0 + timedelta(seconds=k)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def transition(k: int) -> str:
    return f"{iso(k)},idle,arming,utilization {k}\n"


# ---------------------------------------------------------------------------------- the kinds
def test_every_file_kind_a_writer_names_is_exported() -> None:
    """A new per-session file (a ``_CsvFile`` of the CSV sink) or a new appended log (a
    ``*.csv`` file name constant) must be a kind of ``gputel.filekinds``."""
    written: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        written.update(re.findall(r'_CsvFile\(\s*self\.log_dir,\s*"(\w+)"', text))
        written.update(re.findall(r'^[A-Z_]*FILE = "(\w+)\.csv"', text, re.MULTILINE))
    assert written == {k.name for k in KINDS}


def test_every_column_has_one_type() -> None:
    for kind in KINDS:
        assert not kind.untyped(), f"{kind.name}: give these columns a type: {kind.untyped()}"
        for c, t in kind.measured.items():
            # A name means the same in every file: a measurement is never typed otherwise.
            assert COLUMN_TYPES.get(c, t) == t, (kind.name, c)
    assert KIND_BY_NAME["gpu"].type_of("clock_event_reasons") == "BIGINT"
    assert KIND_BY_NAME["gpu"].type_of("allocations") == "VARCHAR"
    assert KIND_BY_NAME["allocations"].type_of("start") == "TIMESTAMPTZ"


def test_mig_rows_of_the_real_writer(tmp_path: Path) -> None:
    log = tmp_path / "log"
    sink = CsvSink(log, host="n1")
    for k in range(3):
        mig = (
            MigReading(1, 0, "MIG-a", sm_active_pct=10.0 * k, memory_used_mib=100.0),
            MigReading(2, None, "MIG-b", memory_total_mib=20000.0),
        )
        gpu = GpuReading(0, "GPU-0", "H100", utilization_gpu_pct=50.0, mig=mig)
        sink.write(Sample(T0 + timedelta(seconds=k), float(k), [gpu], HostReading(), []))
    sink.close()
    out = tmp_path / "out"
    written = export_parquet([log], out)
    assert written["mig"] == 6 and written["gpu"] == 3 and written["host"] == 3
    counts = assert_dataset_equals_csvs(out, [log])
    assert counts["mig"] == 6
    # The second tick falls on the next UTC day: one partition per date.
    dates = {p.parent.name for p in (out / "mig").rglob("*.parquet")}
    assert dates == {"date=2026-11-22", "date=2026-11-23"}


# ---------------------------------------------------------------------------------- growing
def test_a_file_being_written_is_picked_up_where_it_left_off(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    f = log / "transitions.csv"
    # Two whole rows and the start of a third, as a reader may catch a row being written.
    f.write_text(TRANSITIONS_HEADER + transition(0) + transition(1) + transition(2)[:12])
    out = tmp_path / "out"
    assert export_parquet([log], out)["transitions"] == 2
    with open(f, "a") as fh:
        fh.write(transition(2)[12:] + transition(3))
    assert export_parquet([log], out, "incremental")["transitions"] == 2
    assert export_parquet([log], out, "incremental")["transitions"] == 0
    assert assert_dataset_equals_csvs(out, [log])["transitions"] == 4
    entry = next(iter(json.loads((out / MANIFEST).read_text())["files"].values()))
    assert entry["rows"] == 4 and entry["offset"] == f.stat().st_size


def test_a_rotated_log_is_recognised_and_its_successor_exported(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(0) + transition(1))
    out = tmp_path / "out"
    export_parquet([log], out)
    # logrotate: rename, then compress; one more row had reached the old file first.
    with open(log / "transitions.csv", "a") as fh:
        fh.write(transition(2))
    data = (log / "transitions.csv").read_bytes()
    (log / "transitions.csv").unlink()
    (log / "transitions.csv.1.gz").write_bytes(gzip.compress(data))
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(3))
    assert export_parquet([log], out, "incremental")["transitions"] == 2
    assert assert_dataset_equals_csvs(out, [log])["transitions"] == 4


def test_a_run_that_died_before_its_manifest_is_repeated_without_duplicates(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(0) + transition(1))
    out = tmp_path / "out"
    export_parquet([log], out)
    # As if the run had moved its files into place and died before recording them.
    (out / MANIFEST).write_text(json.dumps({"version": 1, "files": {}}))
    with open(log / "transitions.csv", "a") as fh:
        fh.write(transition(2))
    export_parquet([log], out, "incremental")
    assert assert_dataset_equals_csvs(out, [log])["transitions"] == 3


# ---------------------------------------------------------------------------------- content
def test_files_of_an_older_layout_have_nulls_for_the_columns_they_lack(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "gpu-20261122T235958Z-old.csv").write_text(
        "timestamp,gpu,uuid,utilization_gpu_pct,power_w,energy_j,allocations\n"
        f"{iso(0)},0,GPU-0,50.0,100.00,0.000,0042\n{iso(1)},0,GPU-0,60.0,110.00,105.000,\n"
    )
    out = tmp_path / "out"
    export_parquet([log], out)
    types, _ = dataset(out, KIND_BY_NAME["gpu"])
    assert types["sm_clock_mhz"] == "DOUBLE" and types["clock_event_reasons"] == "BIGINT"
    assert assert_dataset_equals_csvs(out, [log])["gpu"] == 2
    con = duckdb.connect()
    got = con.execute(
        "SELECT allocations, sm_clock_mhz, lost, session "
        f"FROM read_parquet('{out}/gpu/**/*.parquet') ORDER BY timestamp"
    ).fetchall()
    assert got == [
        ("0042", None, None, "gpu-20261122T235958Z-old.csv"),
        (None, None, None, "gpu-20261122T235958Z-old.csv"),
    ]


def test_neutralised_text_is_kept_as_the_csv_has_it(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "processes-20261122T235958Z-n.csv").write_text(
        "timestamp,gpu,pid,user,command,job,memory_used_mib,sm_util_pct\n"
        f"{iso(0)},0,123,alice,'=HYPERLINK(1),'-job,100,5\n"
    )
    out = tmp_path / "out"
    export_parquet([log], out)
    con = duckdb.connect()
    got = con.execute(
        f"SELECT command, job, pid FROM read_parquet('{out}/processes/**/*.parquet')"
    ).fetchall()
    assert got == [("'=HYPERLINK(1)", "'-job", 123)]


def test_a_bad_cell_is_one_line_naming_the_file_and_exit_2(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    bad = log / "gpu-20261122T235958Z-n.csv"
    bad.write_text(f"timestamp,gpu,power_w,utilization_gpu_pct\n{iso(0)},0,lots,1\n")
    with pytest.raises(CsvReadError, match=re.escape(str(bad)) + ".*lots"):
        export_parquet([log], tmp_path / "lib")
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "export", "--parquet", str(tmp_path / "out"), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")},
    )
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and str(bad) in res.stderr


def test_incremental_refuses_a_directory_that_is_no_export(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(0))
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu").mkdir()
    with pytest.raises(ExportRefused, match="no gputel export"):
        export_parquet([log], out, "incremental")
    # An empty or missing OUT is fine: the first run of a timer.
    assert export_parquet([log], tmp_path / "new", "incremental")["transitions"] == 1


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(0))
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "export", "--parquet", str(tmp_path / "o"), str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.strip() == f"wrote {tmp_path / 'o' / 'transitions'} (1 row)"


def test_an_incremental_run_over_no_rows_is_no_failure(tmp_path: Path) -> None:
    """A timer on a node that has recorded nothing yet: exit 0, nothing new."""
    log = tmp_path / "log"
    log.mkdir()
    cmd = [sys.executable, "-m", "gputel", "export", "--parquet", str(tmp_path / "o"), str(log)]
    res = subprocess.run([*cmd, "--incremental"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "nothing new" in res.stdout, res.stderr
    # Without --incremental, no rows is an error, and no OUT is made.
    cmd = [*cmd[:5], str(tmp_path / "p"), str(log)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "no telemetry rows" in res.stderr
    assert not (tmp_path / "p").exists()


def test_a_terminal_shows_progress(tmp_path: Path) -> None:
    import pty

    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(TRANSITIONS_HEADER + transition(0))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gputel", "export", "--parquet", str(tmp_path / "o"), str(log)],
        stdout=subprocess.PIPE,
        stderr=slave,
        env={**os.environ, "TERM": "xterm", "COLUMNS": "100"},
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    assert proc.wait(timeout=60) == 0
    os.close(master)
    assert b"exporting" in seen


def test_a_file_that_grows_while_it_is_read_goes_out_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recorder appends while the export reads the file, and the read meets half a row:
    the rows that were whole when the run began go out, the rest with the next run."""
    from gputel.analysis import export

    log = tmp_path / "log"
    log.mkdir()
    f = log / "transitions.csv"
    f.write_text(TRANSITIONS_HEADER + transition(0) + transition(1))
    real = export._copy
    calls: list[Path] = []

    def copy_while_writing(con: object, s: object, csv: Path, *rest: object) -> int:
        if not calls:
            with open(f, "a") as fh:
                fh.write(transition(2) + transition(3)[:10])
        calls.append(csv)
        return real(con, s, csv, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(export, "_copy", copy_while_writing)
    out = tmp_path / "out"
    assert export_parquet([log], out)["transitions"] == 2
    assert calls[0] == f and calls[1] != f  # the direct read, then the slice
    with open(f, "a") as fh:
        fh.write(transition(3)[10:])
    assert export_parquet([log], out, "incremental")["transitions"] == 2
    assert assert_dataset_equals_csvs(out, [log])["transitions"] == 4


def test_a_log_filed_under_another_node_later_is_not_exported_twice(tmp_path: Path) -> None:
    """Before the first session the node's transitions.csv belongs to its directory's name; once
    a gpu file names the node, the rows already out are not exported again under it."""
    log = tmp_path / "gputel"
    log.mkdir()
    f = log / "transitions.csv"
    f.write_text(TRANSITIONS_HEADER + transition(0))
    out = tmp_path / "out"
    export_parquet([log], out)
    (log / "gpu-20261122T235958Z-node7.csv").write_text(
        f"timestamp,gpu,utilization_gpu_pct\n{iso(1)},0,50.0\n"
    )
    with open(f, "a") as fh:
        fh.write(transition(1))
    assert export_parquet([log], out, "incremental")["transitions"] == 1
    con = duckdb.connect()
    nodes = con.execute(
        f"SELECT node, count(*) FROM read_parquet('{out}/transitions/**/*.parquet') "
        "GROUP BY node ORDER BY node"
    ).fetchall()
    assert nodes == [("gputel", 1), ("node7", 1)]


def test_a_log_an_upgrade_moved_aside_is_exported_with_its_older_layout(tmp_path: Path) -> None:
    import logging

    from gputel.control.allocations import SUMMARY_COLUMNS
    from gputel.formats import RowAppender

    log = tmp_path / "log"
    log.mkdir()
    old_header = [c for c in SUMMARY_COLUMNS if c != "xids"]
    old_row = {"id": "job-1", "gpus": "0", "start": iso(0), "end": iso(5), "energy_j": "10.5"}
    (log / "allocations.csv").write_text(
        ",".join(old_header) + "\n" + ",".join(old_row.get(c, "") for c in old_header) + "\n"
    )
    # This version's writer moves the older file aside before its first row.
    new_row = {"id": "job-2", "gpus": "0;1", "start": iso(6), "end": iso(9), "xids": "79"}
    appender = RowAppender(log / "allocations.csv", SUMMARY_COLUMNS, logging.getLogger("t"))
    assert appender.append([new_row.get(c) for c in SUMMARY_COLUMNS])
    assert len(list(log.glob("allocations-pre-*.csv"))) == 1
    out = tmp_path / "out"
    assert export_parquet([log], out)["allocations"] == 2
    assert assert_dataset_equals_csvs(out, [log])["allocations"] == 2
    con = duckdb.connect()
    got = con.execute(
        f"SELECT id, xids, energy_j FROM read_parquet('{out}/allocations/**/*.parquet') ORDER BY id"
    ).fetchall()
    assert got == [("job-1", None, 10.5), ("job-2", "79", None)]
