"""``gputel plot``: a timeline figure per GPU from recorded CSVs.

Utilization, power and temperature per GPU on a shared time axis, with throttling shaded and
allocation spans drawn as bands, so the slow minute of a job can be seen at a glance. Long
recordings are bucketed in DuckDB (a bucket width that doubles from one second until at most
``MAX_BUCKETS`` buckets span the recording), so Python only sees a few thousand points per GPU.
matplotlib and DuckDB: the ``analysis`` extra.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter
from gputel.analysis.groups import THROTTLE_MASK

MAX_BUCKETS = 4000


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


@dataclass
class _Series:
    """Bucket means of one metric (bucket index → mean) at one bucket width."""

    width: float
    buckets: dict[int, float] = field(default_factory=dict)

    def points(self) -> tuple[list[float], list[float]]:
        """Bucket centres and means; a NaN where buckets are missing, so lines break at gaps."""
        xs: list[float] = []
        ys: list[float] = []
        prev: int | None = None
        for idx in sorted(self.buckets):
            if prev is not None and idx > prev + 1:
                xs.append((prev + 1.5) * self.width)
                ys.append(float("nan"))
            xs.append((idx + 0.5) * self.width)
            ys.append(self.buckets[idx])
            prev = idx
        return xs, ys


@dataclass
class _Gpu:
    name: str = ""
    util: _Series = field(default_factory=lambda: _Series(1.0))
    power: _Series = field(default_factory=lambda: _Series(1.0))
    temp: _Series = field(default_factory=lambda: _Series(1.0))
    throttle: _Series = field(default_factory=lambda: _Series(1.0))


def bucket_width(span_s: float) -> float:
    """One second, doubled until the span fits in ``MAX_BUCKETS`` buckets."""
    width = 1.0
    while span_s / width > MAX_BUCKETS:
        width *= 2
    return width


#: Per GPU and bucket: the means the figure draws (a bucket with no value of a metric has none).
_BUCKETS_SQL = f"""
SELECT gpu, floor(ts / $width)::BIGINT AS idx, avg(utilization_gpu_pct), avg(power_w),
       avg(temperature_c),
       avg(CASE WHEN clock_event_reasons & {THROTTLE_MASK} <> 0 THEN 1.0
                WHEN clock_event_reasons IS NOT NULL THEN 0.0 END)
FROM gpu GROUP BY ALL
"""


def collect(
    paths: Iterable[Path], flt: ReportFilter | None = None, con: Any = None
) -> tuple[dict[int, _Gpu], dict[str, list[float]]]:
    """Per-GPU bucketed series (bucketed in DuckDB) and allocation spans (id → [first, last])."""
    flt = flt or ReportFilter()
    con = con or duck.connect()
    duck.load(
        con,
        duck.find_files(list(paths)),
        "gpu",
        flt,
        wrap=lambda inner: (
            "SELECT ts, gpu, utilization_gpu_pct, power_w, temperature_c, clock_event_reasons, "
            f"allocations, name FROM ({inner})"
        ),
    )
    gpus: dict[int, _Gpu] = {
        idx: _Gpu(name=name or "")
        for idx, name in con.execute(
            "SELECT gpu, arg_min(name, ts) FROM gpu GROUP BY gpu"
        ).fetchall()
    }
    first, last = con.execute("SELECT min(ts), max(ts) FROM gpu").fetchone()
    width = bucket_width((last - first) if first is not None else 0.0)
    for g in gpus.values():
        g.util, g.power, g.temp, g.throttle = (_Series(width) for _ in range(4))
    for idx, bucket, util, power, temp, throttle in con.execute(
        _BUCKETS_SQL, {"width": width}
    ).fetchall():
        g = gpus[idx]
        for series, value in ((g.util, util), (g.power, power), (g.temp, temp)):
            if value is not None:
                series.buckets[bucket] = value
        if throttle is not None:
            g.throttle.buckets[bucket] = throttle
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
        from matplotlib.colors import to_rgba
    except ImportError:
        raise PlotUnavailable(
            "gputel plot needs matplotlib: pip install 'gputel[analysis]'"
        ) from None
    return plt, mdates, to_rgba


def plot(paths: Iterable[Path], output: Path, flt: ReportFilter | None = None) -> int:
    """Write the figure to ``output`` (PNG, SVG or PDF by suffix); returns the GPU count."""
    plt, mdates, to_rgba = _load_matplotlib()
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
        # One collection of bars, shaded by the throttled share of each bucket (a patch per
        # bucket took seconds per GPU to draw on a week).
        tx, ty = g.throttle.points()
        days = g.throttle.width / 86400
        bars = [
            (mdates.date2num(datetime.fromtimestamp(x, timezone.utc)) - days / 2, days)
            for x, y in zip(tx, ty, strict=True)
            if y > 0  # NaN (a gap) compares False
        ]
        if bars:
            ax.broken_barh(
                bars,
                (0, 105),
                facecolors=[to_rgba("tab:red", 0.15 * y) for y in ty if y > 0],
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
