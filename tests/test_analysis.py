"""``gputel report``, ``replay`` and ``plot`` over CSVs with known content."""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gputel.analysis.duck import install_hint
from gputel.analysis.filter import ReportFilter
from gputel.analysis.replay import load_series, replay, sweep
from gputel.analysis.report import build_report, host_key
from gputel.schema import GPU_CSV_COLUMNS, HOST_CSV_COLUMNS
from gputel.supervisor.states import ActivityState, Thresholds

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=timezone.utc)


def iso(dt: datetime) -> str:
    return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def power_of(util: float) -> float:
    return 70.0 + 6.3 * util


def write_gpu_csv(
    path: Path,
    start: datetime,
    ticks: int,
    util: Callable[[int, int], float],
    gpus: int = 2,
    interval: float = 1.0,
    drop: frozenset[int] = frozenset(),
    allocations: Callable[[int], str] = lambda k: "",
    reasons: Callable[[int, float], int | None] = lambda k, u: 4 if u > 50 else 0,
    power_supported: bool = True,
    sm: Callable[[int, int], float | None] = lambda k, g: None,
    head: int = 0,
) -> dict[int, float]:
    """Rows like the recorder's; returns per-GPU joules between the first and last written row.

    The energy counter integrates power exactly (rectangle per interval), as the sim does.
    """
    counters = [0.0] * gpus
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(GPU_CSV_COLUMNS)
        for k in range(ticks):
            ts = iso(start + timedelta(seconds=k * interval))
            for g in range(gpus):
                u = util(k, g)
                p = power_of(u)
                if k not in drop:
                    row = dict.fromkeys(GPU_CSV_COLUMNS, "")
                    row.update(
                        timestamp=ts,
                        gpu=g,
                        uuid=f"GPU-{g}",
                        name="Test GPU",
                        lost=0,
                        utilization_gpu_pct=u,
                        sm_active_pct="" if sm(k, g) is None else sm(k, g),
                        memory_used_mib=1000 + 10 * u,
                        temperature_c=35 + u / 2,
                        power_w=p if power_supported else "",
                        energy_j=counters[g] - first.get(g, counters[g]),
                        clock_event_reasons=reasons(k, u),
                        allocations=allocations(k),
                        pretrigger=1 if k < head else 0,
                    )
                    if power_supported:
                        first.setdefault(g, counters[g])
                        row["energy_j"] = counters[g] - first[g]
                        last[g] = counters[g]
                    else:
                        row["energy_j"] = ""
                    w.writerow([row[c] for c in GPU_CSV_COLUMNS])
                counters[g] += p * interval
    return {g: last[g] - first[g] for g in last}


def write_host_csv(path: Path, start: datetime, ticks: int, cpu: float = 25.0) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HOST_CSV_COLUMNS)
        for k in range(ticks):
            row = dict.fromkeys(HOST_CSV_COLUMNS, "")
            row.update(
                timestamp=iso(start + timedelta(seconds=k)),
                cpu_util_pct=cpu,
                cpu_package_power_w=100.0,
                cpu_package_energy_j=100.0 * k,
            )
            w.writerow([row[c] for c in HOST_CSV_COLUMNS])


def pattern(k: int, g: int) -> float:
    return 90.0 if 10 <= k < 40 else 0.0


def test_energy_gaps_throttle_and_utilization(tmp_path: Path) -> None:
    expected = write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-node1.csv", T0, 60, pattern, drop=frozenset({20, 21, 22})
    )
    write_host_csv(tmp_path / "host-20261122T100000Z-node1.csv", T0, 60)
    report = build_report([tmp_path])
    (session,) = report["sessions"]
    assert session["interval_s"] == 1.0
    assert session["duration_s"] == 60.0
    for g in session["gpus"]:
        assert g["samples"] == 57
        assert g["missing"] == 3
        assert g["energy_j"] == pytest.approx(expected[g["gpu"]])
        assert g["util_max_pct"] == 90.0
        assert g["util_p95_pct"] == 90.0
        assert g["util_mean_pct"] == pytest.approx(90.0 * 27 / 57, abs=1e-3)
        assert g["throttle_s"] == {"sw_power_cap": 27.0}
        assert g["temperature_max_c"] == 80.0
        assert g["power_peak_w"] == pytest.approx(power_of(90))
    host = session["host_stats"]
    assert host["samples"] == 60
    assert host["cpu_util_mean_pct"] == 25.0
    assert host["rapl_energy_j"] == pytest.approx(5900.0)


def test_gz_input_reads_the_same(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    gz = tmp_path / "gz"
    plain.mkdir()
    gz.mkdir()
    write_gpu_csv(plain / "gpu-20261122T100000Z-n.csv", T0, 30, pattern)
    write_gpu_csv(gz / "gpu-20261122T100000Z-n.csv.1.gz", T0, 30, pattern)
    a = build_report([plain])["sessions"][0]["gpus"]
    b = build_report([gz])["sessions"][0]["gpus"]
    assert a == b


def test_rollover_continues_a_session_and_a_pause_starts_a_new_one(tmp_path: Path) -> None:
    e1 = write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 20, pattern, gpus=1)
    # Rollover: the next file starts one interval after the last row (same session).
    e2 = write_gpu_csv(
        tmp_path / "gpu-20261122T100020Z-n.csv",
        T0 + timedelta(seconds=20),
        20,
        lambda k, g: pattern(k + 20, g),
        gpus=1,
    )
    # Telemetry stopped for five minutes: a new session.
    write_gpu_csv(
        tmp_path / "gpu-20261122T100540Z-n.csv", T0 + timedelta(seconds=340), 10, pattern, gpus=1
    )
    sessions = build_report([tmp_path])["sessions"]
    assert len(sessions) == 2
    first = sessions[0]["gpus"][0]
    assert first["samples"] == 40
    assert first["missing"] == 0
    # Within each file the counter; across the join ∫ power dt over the one interval between.
    join = power_of(pattern(19, 0)) / 2 + power_of(pattern(20, 0)) / 2
    assert first["energy_j"] == pytest.approx(e1[0] + e2[0] + join)


def test_unsupported_power_gives_empty_energy_not_zero(tmp_path: Path) -> None:
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv", T0, 10, pattern, gpus=1, power_supported=False
    )
    g = build_report([tmp_path])["sessions"][0]["gpus"][0]
    assert g["energy_j"] is None
    assert g["power_mean_w"] is None


def test_no_utilization_gives_empty_idle_not_zero(tmp_path: Path) -> None:
    # A GPU in MIG mode has no utilization: its idle time is unknown, not 0 s.
    path = tmp_path / "gpu-20261122T100000Z-n.csv"
    write_gpu_csv(path, T0, 10, pattern, gpus=1)
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    col = rows[0].index("utilization_gpu_pct")
    for row in rows[1:]:
        row[col] = ""
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    g = build_report([tmp_path])["sessions"][0]["gpus"][0]
    assert g["samples"] == 10
    assert g["util_mean_pct"] is None
    assert g["idle_s"] is None


def test_allocation_view_and_filters(tmp_path: Path) -> None:
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv",
        T0,
        60,
        pattern,
        allocations=lambda k: "job-7" if 15 <= k < 30 else ("job-8;job-9" if k >= 50 else ""),
    )
    report = build_report([tmp_path])
    ids = [a["id"] for a in report["allocations"]]
    assert ids == ["job-7", "job-8", "job-9"]
    job7 = report["allocations"][0]
    assert job7["gpus"] == [0, 1]
    assert job7["samples"] == 30
    assert job7["duration_s"] == 15.0
    # Each tagged row carries the interval that ends at it: 15 intervals per GPU, matching the
    # 15 s duration (the interval before row 15 was already busy).
    assert job7["energy_j"] == pytest.approx(2 * 15 * power_of(90))
    only = build_report([tmp_path], ReportFilter(allocation="job-7"))
    assert only["sessions"] == []
    assert [a["id"] for a in only["allocations"]] == ["job-7"]
    since = T0.timestamp() + 45
    late = build_report([tmp_path], ReportFilter(since=since, gpus=frozenset({1})))
    (g,) = late["sessions"][0]["gpus"]
    assert g["gpu"] == 1
    assert g["samples"] == 15


def test_host_key_from_recorder_names() -> None:
    assert host_key(Path("gpu-20261122T034512Z-node01.csv")) == "node01"
    assert host_key(Path("host-20261122T034512Z-gpu-7.example.csv.2.gz")) == "gpu-7.example"


def test_replay_transitions_and_capture(tmp_path: Path) -> None:
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv",
        T0,
        80,
        lambda k, g: 90.0 if (10 <= k < 40 or 44 <= k < 46) else 0.0,
    )
    series = load_series([tmp_path])
    assert len(series.ts) == 80
    assert series.interval == 1.0
    result = replay(series, Thresholds(20, 5, 10, 15))
    states = [(t.to_state, round(t.at - T0.timestamp())) for t in result.transitions]
    assert states == [
        (ActivityState.ARMING, 10),
        (ActivityState.ACTIVE, 15),
        (ActivityState.COOLING, 40),
        (ActivityState.ACTIVE, 44),  # a blip while cooling keeps telemetry on
        (ActivityState.COOLING, 46),
        (ActivityState.IDLE, 61),
    ]
    assert result.busy_s == 32.0
    assert result.captured_busy_s == 27.0  # the first 5 s are spent arming
    assert len(result.telemetry_spans) == 1
    grid = sweep(series, Thresholds(20, 5, 10, 15))
    assert len(grid) == 27
    assert all(0 <= (r.capture_ratio or 0) <= 1 for r in grid)


def test_replay_with_sm_activity_where_rows_have_it(tmp_path: Path) -> None:
    """GPU 0 (GPM): utilization always 90, SMs busy only in ticks 10-39; GPU 1 (no GPM) idle."""
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv",
        T0,
        80,
        lambda k, g: 90.0 if g == 0 else 0.0,
        sm=lambda k, g: (80.0 if 10 <= k < 40 else 5.0) if g == 0 else None,
    )
    th = Thresholds(20, 5, 10, 15)
    by_util = replay(load_series([tmp_path]), th)
    assert [round(t.at - T0.timestamp()) for t in by_util.transitions] == [0, 5]
    by_sm = replay(load_series([tmp_path], activity="sm"), th)
    states = [(t.to_state, round(t.at - T0.timestamp())) for t in by_sm.transitions]
    assert states == [
        (ActivityState.ARMING, 10),
        (ActivityState.ACTIVE, 15),
        (ActivityState.COOLING, 40),
        (ActivityState.IDLE, 55),
    ]
    # The CLI takes the signal from the setting, flag or environment.
    res = _gputel("replay", str(tmp_path), "--activity", "sm", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["starts"] == 1
    res = _gputel("replay", str(tmp_path), "--activity", "tensor")
    assert res.returncode == 2 and "GPUTEL_ACTIVITY" in res.stderr


def _gputel(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "gputel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def test_cli_report_json_csv_and_bad_input(tmp_path: Path) -> None:
    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 20, pattern)
    out = _gputel("report", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["sessions"][0]["gpus"][0]["samples"] == 20
    out = _gputel("report", str(tmp_path), "--csv")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert [r["scope"] for r in rows] == ["session", "gpu", "gpu"]
    table = _gputel("report", str(tmp_path))
    assert table.returncode == 0 and "session 1" in table.stdout
    for bad in (["--since", "yesterday-ish"], ["--gpu", "a"], [str(tmp_path / "missing")]):
        res = _gputel("report", str(tmp_path), *bad)
        assert res.returncode == 2, (bad, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
        assert "Traceback" not in res.stderr


def test_cli_replay(tmp_path: Path) -> None:
    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 60, pattern)
    res = _gputel("replay", str(tmp_path), "--start-seconds", "2", "--stop-seconds", "5", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["thresholds"]["start_seconds"] == 2
    assert data["starts"] == 1
    sweep_out = _gputel("replay", str(tmp_path), "--sweep")
    assert sweep_out.returncode == 0 and "threshold sweep" in sweep_out.stdout


def test_plot_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv",
        T0,
        120,
        pattern,
        allocations=lambda k: "job-1" if 15 <= k < 30 else "",
    )
    out = tmp_path / "fig.png"
    res = _gputel("plot", str(tmp_path), "-o", str(out))
    assert res.returncode == 0, res.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(data) < 2_000_000
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 670)


def test_plot_without_matplotlib_says_how_to_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gputel.analysis import plot

    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 5, pattern)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plot.PlotUnavailable, match=re.escape(install_hint())):
        plot.plot([tmp_path], tmp_path / "x.png")


@pytest.mark.parametrize("command", ["report", "replay", "plot", "export", "job"])
def test_without_duckdb_one_line_says_how_to_get_it(tmp_path: Path, command: str) -> None:
    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 5, pattern)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "duckdb.py").write_text("raise ImportError('no duckdb here')\n")
    args = [command, str(tmp_path)] if command != "job" else [command, "job-1", str(tmp_path)]
    if command == "export":
        args += ["--parquet", str(tmp_path / "out")]
    res = subprocess.run(
        [sys.executable, "-m", "gputel", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(blocker)},
    )
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(install_hint()), res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda text: text.replace("2026-11-22T10:00:03.000Z", "not-a-time-at-all"),
        lambda text: text.replace(",Test GPU,0,0.0,", ",Test GPU,0,busy,", 1),
        lambda text: text.replace("Test GPU", "Test \udcff GPU", 1),
        lambda text: text.replace(",0,GPU-0,Test GPU,", ",zero,GPU-0,Test GPU,", 1),
        lambda text: text.replace(",0,GPU-0,Test GPU,", ",\u00b2,GPU-0,Test GPU,", 1),
    ],
    ids=["timestamp", "number", "encoding", "gpu-index", "gpu-superscript"],
)
def test_damaged_csv_is_one_line_naming_the_file(
    tmp_path: Path, damage: Callable[[str], str]
) -> None:
    path = tmp_path / "gpu-20261122T100000Z-n.csv"
    write_gpu_csv(path, T0, 10, pattern)
    text = damage(path.read_text())
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    for command in ("report", "replay"):
        res = _gputel(command, str(tmp_path))
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0], res.stderr
        assert "Traceback" not in res.stderr


def test_pretrigger_seconds_and_throttled_seconds(tmp_path: Path) -> None:
    """The head's span before the recorder's first own row; seconds with a slowdown bit."""
    reasons = {12: 0x4, 13: 0x4 | 0x40, 14: 0x1, 15: 0x2}  # power cap, + thermal, idle, setting
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-node1.csv",
        T0,
        30,
        pattern,
        interval=0.5,
        head=8,
        reasons=lambda k, u: reasons.get(k, 0),
    )
    write_gpu_csv(tmp_path / "gpu-20261122T110000Z-node1.csv", T0 + timedelta(hours=1), 10, pattern)
    first, second = build_report([tmp_path])["sessions"]
    assert first["pretrigger_s"] == 4.0  # 8 head ticks of 0.5 s
    assert second["pretrigger_s"] == 0.0
    assert first["duration_s"] == 15.0  # the head is part of the session
    # Idle and a clocks setting are not throttling; two samples with a slowdown bit are 1 s.
    assert [g["throttled_s"] for g in first["gpus"]] == [1.0, 1.0]
    assert first["gpus"][0]["throttle_s"] == {
        "applications_clocks_setting": 0.5,
        "gpu_idle": 0.5,
        "hw_thermal_slowdown": 0.5,
        "sw_power_cap": 1.0,
    }
