"""``gputel plot``: what the figure draws, read from its artists (not by eye)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gputel.analysis import plot
from gputel.analysis.filter import ReportFilter, UnknownAllocation
from test_analysis import T0, iso, pattern, write_gpu_csv

pytest.importorskip("duckdb")
pytest.importorskip("matplotlib")

EVENT_COLUMNS = ("timestamp", "gpu", "uuid", "event", "xid", "detail", "allocations")


def _retag(path: Path, tag: Callable[[int, int], str]) -> None:
    """Give GPU ``g``'s row of tick ``k`` the allocations ``tag(k, g)``."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    start = rows[0]["timestamp"]
    ticks = sorted({r["timestamp"] for r in rows})
    index = {t: k for k, t in enumerate(ticks)}
    assert ticks[0] == start
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            r["allocations"] = tag(index[r["timestamp"]], int(r["gpu"]))
            w.writerow(r)


def recording(tmp: Path) -> Path:
    """Two sessions with a 60 s hole between them: GPU 0 works and is throttled, job-a holds
    GPU 1 only (ticks 10-29), the second session has a pre-trigger head; an Xid on GPU 1."""
    first = tmp / "gpu-20261122T100000Z-n.csv"
    write_gpu_csv(first, T0, 40, lambda k, g: 90.0 if g == 0 and k >= 5 else 10.0)
    _retag(first, lambda k, g: "job-a" if g == 1 and 10 <= k < 30 else "")
    write_gpu_csv(
        tmp / "gpu-20261122T100140Z-n.csv",
        T0 + timedelta(seconds=100),
        30,
        lambda k, g: 50.0,
        head=5,
        allocations=lambda k: "job-b" if k >= 10 else "",
    )
    with open(tmp / "events.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(EVENT_COLUMNS)
        w.writerow([iso(T0 + timedelta(seconds=20)), 1, "GPU-1", "xid", "79", "", "job-a"])
        w.writerow([iso(T0 + timedelta(seconds=110)), 0, "GPU-0", "xid", "13", "", ""])
    with open(tmp / "transitions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("timestamp", "from_state", "to_state", "reason"))
        for at, to_state in ((0, "telemetry_on"), (40, "telemetry_off"), (20, "active")):
            w.writerow([iso(T0 + timedelta(seconds=at)), "x", to_state, "test"])
        for at, to_state in ((105, "telemetry_on"), (130.2, "telemetry_off")):
            w.writerow([iso(T0 + timedelta(seconds=at)), "x", to_state, "test"])
    return tmp


def _gids(ax: Any, gid: str) -> list[Any]:
    return [a for a in [*ax.patches, *ax.lines] if a.get_gid() == gid]


def test_panels_axes_and_marks(tmp_path: Path) -> None:
    timeline = plot.collect([recording(tmp_path)])
    fig = plot.figure(timeline)
    # One panel per GPU, three axes each: %, W and °C.
    assert len(fig.axes) == 6
    panels = fig.axes[:2]
    assert [ax.get_title(loc="left") for ax in panels] == ["GPU 0 Test GPU", "GPU 1 Test GPU"]
    for n, ax in enumerate(panels):
        twins = [
            t
            for t in fig.axes[2:]
            if t.get_shared_x_axes().joined(t, ax) and t.bbox.bounds == ax.bbox.bounds
        ]
        assert sorted(t.get_ylabel() for t in twins) == [plot.POWER_LABEL, plot.TEMP_LABEL], n
        assert ax.get_ylabel() == plot.UTIL_LABEL
    gpu0, gpu1 = panels
    # Xid markers: on the GPU that had the event, nowhere else.
    assert len(_gids(gpu0, plot.GID_EVENT)) == 1 and len(_gids(gpu1, plot.GID_EVENT)) == 1
    assert {t.get_text().strip() for t in gpu1.texts} >= {"Xid 79", "job-a"}
    # Throttled shading only where GPU 0 ran over the power cap (util > 50 in the test rows).
    # One span for the throttled stretch (ticks 5-39), not one per bucket.
    (throttled,) = _gids(gpu0, plot.GID_THROTTLED)
    assert throttled.get_width() * 86400 == pytest.approx(35, abs=0.01)
    assert not _gids(gpu1, plot.GID_THROTTLED)
    # The 60 s without rows between the sessions is shaded on both panels.
    for ax in panels:
        (off,) = _gids(ax, plot.GID_OFF)
        x0, x1 = off.get_x(), off.get_x() + off.get_width()
        assert (x1 - x0) * 86400 == pytest.approx(60, abs=2)
        assert len(_gids(ax, plot.GID_PRETRIGGER)) == 1
    # The agent's telemetry switches (transitions.csv), on every panel.
    for ax in panels:
        switches = _gids(ax, plot.GID_SWITCH)
        assert [line.get_label() for line in switches] == [
            "telemetry on",
            "telemetry off",
            "telemetry on",
            "telemetry off",
        ]
    # job-a's band only on GPU 1 (its rows); job-b on both.
    assert len(_gids(gpu0, plot.GID_ALLOCATION)) == 1
    assert len(_gids(gpu1, plot.GID_ALLOCATION)) == 2
    # One legend for the figure, naming kinds of marks rather than allocations.
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert plot.UTIL_LABEL in labels and plot.POWER_LABEL in labels and "Xid" in labels
    assert "telemetry on" in labels and "pre-trigger" in labels
    assert not any("job-" in label for label in labels)
    assert len(labels) == len(set(labels))


def test_a_week_of_allocations_keeps_one_legend_entry(tmp_path: Path) -> None:
    write_gpu_csv(
        tmp_path / "gpu-20261122T100000Z-n.csv",
        T0,
        3000,
        lambda k, g: 60.0,
        gpus=1,
        allocations=lambda k: f"job-{k // 20}",
    )
    fig = plot.figure(plot.collect([tmp_path]))
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert len(labels) <= 10 and not any("job-" in label for label in labels)
    (ax, *_) = fig.axes
    assert len(_gids(ax, plot.GID_ALLOCATION)) == 150
    # Names only where the band is wide enough to read (none of 150 narrow bands).
    assert not [t for t in ax.texts if t.get_text().startswith("job-")]


def test_allocation_draws_only_its_gpus_and_span(tmp_path: Path) -> None:
    recording(tmp_path)
    timeline = plot.collect([tmp_path], ReportFilter(allocation="job-a"))
    assert list(timeline.gpus) == [1]
    assert timeline.focus == ("job-a", T0.timestamp() + 10, T0.timestamp() + 29)
    fig = plot.figure(timeline)
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    assert ax.get_title(loc="left") == "GPU 1 Test GPU"
    (span,) = _gids(ax, plot.GID_FOCUS)
    assert span.get_width() * 86400 == pytest.approx(19, abs=0.01)
    # The view is the span with context (10 s each side), not the whole recording.
    lo, hi = ax.get_xlim()
    assert (hi - lo) * 86400 == pytest.approx(39, abs=1.5)
    with pytest.raises(UnknownAllocation) as err:
        plot.collect([tmp_path], ReportFilter(allocation="job-c"))
    assert sorted(err.value.closest) == ["job-a", "job-b"]


def _gputel(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gputel", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def test_cli_allocation(tmp_path: Path) -> None:
    recording(tmp_path)
    out = tmp_path / "a.svg"
    res = _gputel("plot", str(tmp_path), "--allocation", "job-a", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"wrote {out} (1 GPU)"
    assert "GPU 1 Test GPU" in out.read_text() and "GPU 0 Test GPU" not in out.read_text()
    res = _gputel("plot", str(tmp_path), "--allocation", "job-x", "-o", str(tmp_path / "b.png"))
    assert res.returncode == 2
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("gputel: no allocation 'job-x' in the given files (closest: job-")
    assert not (tmp_path / "b.png").exists()


@pytest.mark.parametrize("interval", [0.5, 1.0, 5.0])
def test_no_rows_shading_only_where_rows_are_missing(tmp_path: Path, interval: float) -> None:
    """A slow recording interval is not "telemetry off"; a hole of a minute is."""
    write_gpu_csv(tmp_path / "gpu-20261122T100000Z-n.csv", T0, 40, pattern, interval=interval)
    (ax, *_) = plot.figure(plot.collect([tmp_path])).axes
    assert _gids(ax, plot.GID_OFF) == []
    write_gpu_csv(
        tmp_path / "gpu-20261122T101000Z-n.csv",
        T0 + timedelta(seconds=40 * interval + 60),
        40,
        pattern,
        interval=interval,
    )
    (ax, *_) = plot.figure(plot.collect([tmp_path])).axes
    (off,) = _gids(ax, plot.GID_OFF)
    assert off.get_width() * 86400 == pytest.approx(60, abs=2 * max(interval, 1.0))
