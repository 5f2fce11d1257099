"""Fleet report over a tree of nodes, GPM and event columns, and the Parquet export."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from datetime import timedelta, timezone
from pathlib import Path

import pytest

from gputel.analysis import duck
from gputel.analysis.export import ExportRefused, export_parquet
from gputel.analysis.report import build_report
from gputel.schema import GPU_CSV_COLUMNS
from test_analysis import T0, iso, write_gpu_csv, write_host_csv

duckdb = pytest.importorskip("duckdb")

HOURS = 3
INTERVAL = 10.0
TICKS = int(HOURS * 3600 / INTERVAL)


def _node(root: Path, node: str, idle_alloc: str, busy_alloc: str) -> None:
    """GPU 0 allocated to ``idle_alloc`` and idle for hours; GPU 1 busy under ``busy_alloc``."""
    d = root / node
    d.mkdir(parents=True)
    write_gpu_csv(
        d / f"gpu-20261122T100000Z-{node}.csv",
        T0,
        TICKS,
        lambda k, g: 0.0 if g == 0 else 95.0,
        interval=INTERVAL,
        allocations=lambda k: f"{idle_alloc};{busy_alloc}",
    )
    write_host_csv(d / f"host-20261122T100000Z-{node}.csv", T0, 10)


def _one_gpu_allocations(path: Path) -> None:
    """Rewrite ``allocations`` so GPU 0 carries the first id only and GPU 1 the second."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    i_gpu, i_alloc = GPU_CSV_COLUMNS.index("gpu"), GPU_CSV_COLUMNS.index("allocations")
    for row in rows[1:]:
        row[i_alloc] = row[i_alloc].split(";")[int(row[i_gpu])]
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    root = tmp_path / "fleet"
    for n, node in enumerate(("node-a", "node-b", "node-c")):
        _node(root, node, f"idle-{n}" if node == "node-b" else f"warm-{n}", f"0042{n}")
    # Only node-b's GPU 0 stays idle; elsewhere GPU 0 is busy like GPU 1.
    for node in ("node-a", "node-c"):
        path = root / node / f"gpu-20261122T100000Z-{node}.csv"
        text = path.read_text().replace(",0,GPU-0,Test GPU,0,0.0,", ",0,GPU-0,Test GPU,0,95.0,")
        path.write_text(text)
    for path in root.rglob("gpu-*.csv"):
        _one_gpu_allocations(path)
    return root


def test_fleet_lists_only_the_idle_allocation(fleet: Path) -> None:
    report = build_report([fleet])
    assert [n["node"] for n in report["nodes"]] == ["node-a", "node-b", "node-c"]
    (idle,) = report["idle_allocations"]
    assert idle["node"] == "node-b"
    assert idle["allocation"] == "idle-1"
    assert idle["gpus"] == [0]
    assert idle["idle_minutes"] == pytest.approx(HOURS * 60, abs=0.01)
    by_node = {n["node"]: n for n in report["nodes"]}
    assert by_node["node-b"]["idle_allocations"] == 1
    assert by_node["node-a"]["idle_allocations"] == 0
    for n in report["nodes"]:
        assert n["gpus"] == 2
        assert n["gpu_hours_recorded"] == pytest.approx(2 * HOURS)
    assert by_node["node-a"]["gpu_hours_busy"] == pytest.approx(2 * HOURS)
    assert by_node["node-b"]["gpu_hours_busy"] == pytest.approx(HOURS)
    (model,) = report["models"]
    assert model["model"] == "Test GPU" and model["gpus"] == 6
    # Allocation ids stay strings: leading zeros survive.
    assert {a["id"] for a in report["allocations"]} >= {"00420", "00421", "00422"}
    busy = next(a for a in report["allocations"] if a["id"] == "00421")
    assert busy["nodes"] == ["node-b"] and busy["gpus"] == [1]
    # Each node's sessions are its own.
    assert sorted(s["host"] for s in report["sessions"]) == ["node-a", "node-b", "node-c"]


def test_idle_thresholds_are_flags(fleet: Path) -> None:
    longer = build_report([fleet], idle_minutes=HOURS * 60 + 1)
    assert longer["idle_allocations"] == []
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "report", str(fleet), "--json", "--idle-minutes", "60"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert [i["allocation"] for i in json.loads(res.stdout)["idle_allocations"]] == ["idle-1"]
    table = subprocess.run(
        [sys.executable, "-m", "gputel", "report", str(fleet)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert table.returncode == 0, table.stderr
    assert "idle allocated GPUs" in table.stdout and "idle-1" in table.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "gputel", "report", str(fleet), "--idle-util", "150"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("batch_bytes", [duck.BATCH_BYTES, 1], ids=["one-batch", "file-by-file"])
def test_gpm_columns_and_events_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch_bytes: int
) -> None:
    """Newer files carry GPM columns and an events.csv; older ones lack them and still load,
    also when each file is read in a batch of its own (the columns differ between batches)."""
    monkeypatch.setattr(duck, "BATCH_BYTES", batch_bytes)
    old = tmp_path / "gpu-20261122T100000Z-n.csv"
    write_gpu_csv(old, T0, 20, lambda k, g: 90.0, gpus=1, allocations=lambda k: "job-1")
    new = tmp_path / "gpu-20261122T100020Z-n.csv"
    cols = [*GPU_CSV_COLUMNS, "sm_active_pct", "tensor_active_pct"]
    with open(new, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for k in range(20):
            row = dict.fromkeys(cols, "")
            row.update(
                timestamp=iso(T0 + timedelta(seconds=20 + k)),
                gpu=0,
                uuid="GPU-0",
                name="Test GPU",
                utilization_gpu_pct=90.0,
                sm_active_pct=10.0 if k < 10 else 60.0,
                tensor_active_pct=30.0,
                allocations="job-1",
            )
            w.writerow([row[c] for c in cols])
    with open(tmp_path / "events.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "gpu", "uuid", "event", "xid", "detail", "allocations"])
        w.writerow([iso(T0 + timedelta(seconds=25)), 0, "GPU-0", "xid", "79", "fell off", "job-1"])
        w.writerow([iso(T0 + timedelta(seconds=26)), 0, "GPU-0", "xid", "79", "", "job-1"])
        w.writerow([iso(T0 + timedelta(hours=5)), 0, "GPU-0", "ecc_dbe", "", "", ""])
        # A fault on no GPU (an NVSwitch's SXid from the kernel log): an empty gpu cell.
        w.writerow([iso(T0 + timedelta(hours=6)), "", "", "sxid_fatal", "", "SXid 20034", ""])
    report = build_report([tmp_path])
    (session,) = report["sessions"]
    (g,) = session["gpus"]
    assert g["samples"] == 40
    assert g["sm_active_mean_pct"] == pytest.approx(35.0)
    assert g["tensor_active_mean_pct"] == pytest.approx(30.0)
    assert g["stalled_s"] == 10.0  # 90 % busy while SM activity is 10 %
    assert session["events"] == [{"event": "xid", "xid": "79", "count": 2}]
    (job,) = report["allocations"]
    assert job["events"] == [{"event": "xid", "xid": "79", "count": 2}]
    assert report["nodes"][0]["events"] == 4


def test_reading_in_batches_gives_the_same_report(
    fleet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = build_report([fleet])
    monkeypatch.setattr(duck, "BATCH_BYTES", 1)
    assert build_report([fleet]) == whole


def test_gpm_absent_gives_empty_values(tmp_path: Path) -> None:
    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 10, lambda k, g: 50.0, gpus=1)
    g = build_report([tmp_path])["sessions"][0]["gpus"][0]
    assert g["sm_active_mean_pct"] is None and g["stalled_s"] is None


def test_parquet_export_reads_back_with_hive_partitions(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "parquet"
    res = subprocess.run(
        [sys.executable, "-m", "gputel", "export", "--parquet", str(out), str(fleet)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    parts = sorted(
        p.relative_to(out / "gpu").parent.as_posix() for p in out.rglob("gpu/**/*.parquet")
    )
    assert parts == [f"node={n}/date=2026-11-22" for n in ("node-a", "node-b", "node-c")]
    con = duckdb.connect()
    rel = f"read_parquet('{out}/gpu/**/*.parquet', hive_partitioning = true)"
    assert con.execute(f"SELECT count(*) FROM {rel}").fetchone()[0] == 3 * 2 * TICKS
    types = dict(
        con.execute(
            f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {rel})"
        ).fetchall()
    )
    assert types["timestamp"].startswith("TIMESTAMP")
    assert types["utilization_gpu_pct"] == "DOUBLE"
    assert types["gpu"] == "INTEGER"
    assert types["allocations"] == "VARCHAR"
    ids = {r[0] for r in con.execute(f"SELECT DISTINCT allocations FROM {rel}").fetchall()}
    assert "00421" in ids
    first = con.execute(f"SELECT min(timestamp) FROM {rel} WHERE node = 'node-b'").fetchone()[0]
    assert first.astimezone(timezone.utc).isoformat() == "2026-11-22T10:00:00+00:00"
    host = f"read_parquet('{out}/host/**/*.parquet', hive_partitioning = true)"
    assert con.execute(f"SELECT count(*) FROM {host}").fetchone()[0] == 30
    # A second export into the same directory is refused, then allowed with --overwrite.
    again = subprocess.run(
        [sys.executable, "-m", "gputel", "export", "--parquet", str(out), str(fleet)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    with pytest.raises(ExportRefused):
        export_parquet([fleet], out)
    assert export_parquet([fleet], out, "overwrite")["gpu"] == 3 * 2 * TICKS
    assert con.execute(f"SELECT count(*) FROM {rel}").fetchone()[0] == 3 * 2 * TICKS


def test_agent_and_recorder_never_import_duckdb() -> None:
    code = (
        "import sys\n"
        "from gputel.cli.main import build_app, modules_for\n"
        "for word in ('agent', 'record', 'status', 'hook'):\n"
        "    build_app(modules_for([word]))\n"
        "import gputel.telemetry.recorder, gputel.supervisor.agent\n"
        "bad = [m for m in ('duckdb', 'matplotlib') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_idle_stretch_is_exact_mid_minute_and_across_a_rollover(tmp_path: Path) -> None:
    """Minute groups, not rows: an idle stretch that starts mid-minute and crosses a file
    rollover still counts to the tick; a gap in the recording ends it."""
    start = T0 + timedelta(seconds=30)
    busy, idle = 450, 2000

    def util(k: int, g: int) -> float:
        return 90.0 if k < busy else 0.0

    write_gpu_csv(
        tmp_path / "gpu-20261122T100030Z-n.csv",
        start,
        1200,
        util,
        gpus=1,
        allocations=lambda k: "job",
    )
    write_gpu_csv(
        tmp_path / "gpu-20261122T102030Z-n.csv",
        start + timedelta(seconds=1200),
        busy + idle - 1200,
        lambda k, g: util(k + 1200, g),
        gpus=1,
        allocations=lambda k: "job",
    )
    report = build_report([tmp_path])
    (session,) = report["sessions"]
    assert session["gpus"][0]["samples"] == busy + idle
    assert session["gpus"][0]["missing"] == 0
    (item,) = report["idle_allocations"]
    assert item["idle_minutes"] == round(idle / 60, 1)
    assert item["idle_gpu_hours"] == round(idle / 3600, 3)
    (job,) = report["allocations"]
    # Every tagged row but the very first carries its interval's energy.
    assert job["energy_j"] == pytest.approx(session["gpus"][0]["energy_j"])
    assert build_report([tmp_path], idle_minutes=(idle + 4) / 60)["idle_allocations"] == []
    # Two ticks missing in the middle of the idle time split it into two shorter stretches.
    gap = tmp_path / "gap"
    gap.mkdir()
    write_gpu_csv(
        gap / "gpu-20261122T100030Z-n.csv",
        start,
        busy + idle,
        util,
        gpus=1,
        drop=frozenset({busy + 1500, busy + 1501}),
        allocations=lambda k: "job",
    )
    (split,) = build_report([gap], idle_minutes=20)["idle_allocations"]
    assert split["idle_minutes"] == pytest.approx(1500 / 60, abs=1.01)
    assert build_report([gap], idle_minutes=26)["idle_allocations"] == []
