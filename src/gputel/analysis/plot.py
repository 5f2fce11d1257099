"""``gputel plot``: a timeline figure per GPU from recorded CSVs.

Utilization, power and temperature per GPU on a shared time axis, with throttling shaded and
allocation spans drawn as bands, so the slow minute of a job can be seen at a glance. Long
recordings are decimated while streaming (buckets double in width whenever there are too many),
so a week of data plots in constant memory. matplotlib and DuckDB: the ``analysis`` extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter
from gputel.schema import THROTTLE_MASK

MAX_BUCKETS = 4000


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass
class _Series:
    """Bucketed (time, mean) points; merges neighbours whenever the bucket count doubles."""

    width: float
    buckets: dict[int, list[float]] = field(default_factory=dict)  # index -> [sum, n]

    def add(self, ts: float, value: float | None) -> None:
        if value is None:
            return
        b = self.buckets.setdefault(int(ts // self.width), [0.0, 0])
        b[0] += value
        b[1] += 1
        if len(self.buckets) > MAX_BUCKETS:
            self._coarsen()

    def _coarsen(self) -> None:
        merged: dict[int, list[float]] = {}
        for idx, (s, n) in self.buckets.items():
            m = merged.setdefault(idx // 2, [0.0, 0])
            m[0] += s
            m[1] += n
        self.buckets = merged
        self.width *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """Bucket centres and means; a NaN where buckets are missing, so lines break at gaps."""
        xs: list[float] = []
        ys: list[float] = []
        prev: int | None = None
        for idx in sorted(self.buckets):
            if prev is not None and idx > prev + 1:
                xs.append((prev + 1.5) * self.width)
                ys.append(float("nan"))
            s, n = self.buckets[idx]
            xs.append((idx + 0.5) * self.width)
            ys.append(s / n)
            prev = idx
        return xs, ys


@dataclass
class _Gpu:
    name: str = ""
    util: _Series = field(default_factory=lambda: _Series(1.0))
    power: _Series = field(default_factory=lambda: _Series(1.0))
    temp: _Series = field(default_factory=lambda: _Series(1.0))
    throttle: _Series = field(default_factory=lambda: _Series(1.0))


def collect(
    paths: Iterable[Path], flt: ReportFilter | None = None, con: Any = None
) -> tuple[dict[int, _Gpu], dict[str, list[float]]]:
    """Per-GPU decimated series and allocation spans (id → [first, last])."""
    flt = flt or ReportFilter()
    con = con or duck.connect()
    duck.load(con, duck.find_files(list(paths)), "gpu", flt)
    gpus: dict[int, _Gpu] = {
        idx: _Gpu(name=name or "")
        for idx, name in con.execute(
            "SELECT gpu, arg_min(name, ts) FROM gpu GROUP BY gpu"
        ).fetchall()
    }
    cur = con.execute(
        "SELECT ts, gpu, utilization_gpu_pct, power_w, temperature_c, clock_event_reasons "
        "FROM gpu ORDER BY ts, gpu"
    )
    while batch := cur.fetchmany(100_000):
        for ts, idx, util, power, temp, reasons in batch:
            g = gpus[idx]
            g.util.add(ts, util)
            g.power.add(ts, power)
            g.temp.add(ts, temp)
            if reasons is not None:
                g.throttle.add(ts, 1.0 if reasons & THROTTLE_MASK else 0.0)
    only = "" if flt.allocation is None else f"WHERE id = {duck.quote(flt.allocation)}"
    spans = {
        alloc_id: [first, last]
        for alloc_id, first, last in con.execute(
            "SELECT id, min(ts), max(ts) FROM (SELECT ts, unnest(string_split(allocations, ';')) "
            f"AS id FROM gpu WHERE allocations <> '') {only} GROUP BY id"
        ).fetchall()
        if alloc_id
    }
    return gpus, spans


def _load_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        from gputel.analysis.duck import install_hint

        raise PlotUnavailable(f"gputel plot needs matplotlib: {install_hint()}") from None
    return plt, mdates


def plot(paths: Iterable[Path], output: Path, flt: ReportFilter | None = None) -> int:
    """Write the figure to ``output`` (PNG, SVG or PDF by suffix); returns the GPU count."""
    plt, mdates = _load_matplotlib()
    gpus, spans = collect(paths, flt)
    if not gpus:
        raise ValueError("no GPU rows in the given files and time range")

    def dt(xs: list[float]) -> list[datetime]:
        return [datetime.fromtimestamp(x, timezone.utc) for x in xs]

    rows = len(gpus)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 3.2 * rows), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (idx, g) in zip(axes[:, 0], sorted(gpus.items()), strict=True):
        xs, ys = g.util.points()
        ax.plot(dt(xs), ys, color="tab:blue", lw=1, label="utilization %")
        ax.set_ylim(0, 105)
        ax.set_ylabel(f"GPU {idx} util %")
        ax.set_title(f"GPU {idx} {g.name}".strip(), fontsize=9, loc="left")
        tx, ty = g.throttle.points()
        for x, y in zip(tx, ty, strict=True):
            if y > 0:  # NaN (a gap) compares False
                half = g.throttle.width / 2
                ax.axvspan(
                    datetime.fromtimestamp(x - half, timezone.utc),
                    datetime.fromtimestamp(x + half, timezone.utc),
                    color="tab:red",
                    alpha=0.15 * y,
                    lw=0,
                )
        for n, (alloc_id, (a, b)) in enumerate(sorted(spans.items())):
            ax.axvspan(
                datetime.fromtimestamp(a, timezone.utc),
                datetime.fromtimestamp(b, timezone.utc),
                ymin=0.96,
                ymax=1.0,
                color=colors[n % len(colors)],
                alpha=0.8,
                label=f"allocation {alloc_id}",
            )
        right = ax.twinx()
        px, py = g.power.points()
        right.plot(dt(px), py, color="tab:orange", lw=1, label="power W")
        qx, qy = g.temp.points()
        right.plot(dt(qx), qy, color="tab:green", lw=1, ls="--", label="temperature °C")
        right.set_ylabel("W / °C")
        handles = ax.get_legend_handles_labels()
        rhandles = right.get_legend_handles_labels()
        ax.legend(handles[0] + rhandles[0], handles[1] + rhandles[1], fontsize=7, loc="upper left")
    axes[-1, 0].xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M:%S"))
    axes[-1, 0].set_xlabel("time (UTC); red shading: throttled (power/thermal/slowdown)")
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return rows
