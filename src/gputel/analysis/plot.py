"""``gputel plot``: a timeline figure per GPU from recorded CSVs.

One panel per GPU with its own axes for each unit: utilization and SM activity in % on the left,
power in W and temperature in °C on two right-hand axes, so no line is flattened by another's
scale. Marked on every panel: throttling (red shading), time with no rows (telemetry off, grey),
the pre-trigger head of each session (violet), GPU events (vertical lines, Xids named) and the
allocations whose rows are on that GPU (a band along the top, named where there is room). The
legend is one per figure and lists kinds of marks, never every allocation, so it stays readable
over a week. With ``allocation`` the figure shows only that allocation's GPUs around its span.

Long recordings are averaged in DuckDB into buckets (one second wide, doubled until at most
MAX_BUCKETS span the range), so a week of data plots in constant memory and time. matplotlib
and DuckDB: the ``analysis`` extra.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter, UnknownAllocation
from gputel.formats import parse_iso_utc
from gputel.schema import THROTTLE_MASK

MAX_BUCKETS = 4000
#: At most this many event markers per panel (an Xid storm is drawn, not a wall of lines).
MAX_MARKERS = 400
#: An allocation band is named when it is at least this share of the time axis wide.
LABEL_SHARE = 0.04
#: Context drawn around one allocation's span, as a share of the span (at least CONTEXT_MIN_S).
CONTEXT_SHARE = 0.1
CONTEXT_MIN_S = 10.0

#: ``gid`` of each kind of mark, so a figure's artists can be told apart (tests, viewers).
GID_EVENT = "event"
GID_THROTTLED = "throttled"
GID_OFF = "telemetry-off"
GID_PRETRIGGER = "pretrigger"
GID_ALLOCATION = "allocation"
GID_FOCUS = "allocation-span"
GID_SWITCH = "telemetry-switch"

UTIL_LABEL = "utilization %"
POWER_LABEL = "power W"
TEMP_LABEL = "temperature °C"


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def bucket_width(first: float, last: float, interval: float = 1.0) -> float:
    """One second, doubled until it is at least the recording interval (so every bucket of a
    recording has a row) and at most MAX_BUCKETS buckets span ``first`` to ``last``."""
    width = 1.0
    while width < interval or (last - first) / width > MAX_BUCKETS:
        width *= 2
    return width


#: Rows of one GPU whose spacings give the recording interval.
INTERVAL_SAMPLE = 1000


def _interval(con: Any, where: str) -> float:
    """The recording interval: the median spacing of the first rows of one GPU in one file."""
    row = con.execute(f"SELECT min(fid), min(gpu) FROM gpu WHERE {where}").fetchone()
    if row is None or row[0] is None:
        return 1.0
    stamps = [
        float(ts)
        for (ts,) in con.execute(
            f"SELECT ts FROM gpu WHERE {where} AND fid = ? AND gpu = ? ORDER BY ts LIMIT ?",
            [row[0], row[1], INTERVAL_SAMPLE + 1],
        ).fetchall()
    ]
    steps = sorted(b - a for a, b in itertools.pairwise(stamps) if b > a)
    return steps[len(steps) // 2] if steps else 1.0


@dataclass
class _Series:
    """Per-bucket means (index → [mean, 1]), averaged in DuckDB."""

    width: float
    buckets: dict[int, list[float]] = field(default_factory=dict)

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
    rows: _Series = field(default_factory=lambda: _Series(1.0))
    util: _Series = field(default_factory=lambda: _Series(1.0))
    sm: _Series = field(default_factory=lambda: _Series(1.0))
    power: _Series = field(default_factory=lambda: _Series(1.0))
    temp: _Series = field(default_factory=lambda: _Series(1.0))
    throttle: _Series = field(default_factory=lambda: _Series(1.0))


@dataclass
class Timeline:
    """What the figure draws, as plain data."""

    gpus: dict[int, _Gpu]
    #: Per GPU: allocation id → (first, last) row time on that GPU.
    spans: dict[int, dict[str, tuple[float, float]]]
    #: (time, GPU, label) of each GPU event, e.g. ``Xid 79``.
    events: list[tuple[float, int, str]]
    #: (first, last) of each session's pre-trigger head.
    pretrigger: list[tuple[float, float]]
    #: The allocation the figure is about, with its span; None for a whole recording.
    focus: tuple[str, float, float] | None = None
    #: (time, on?) of each telemetry on/off switch the agent logged (``transitions.csv``), when
    #: the figure is of one node.
    switches: list[tuple[float, bool]] = field(default_factory=list)


def _allocation_extent(con: Any, alloc_id: str) -> tuple[list[int], float, float] | None:
    row = con.execute(
        "SELECT list(DISTINCT gpu ORDER BY gpu), min(ts), max(ts) FROM gpu "
        "WHERE list_contains(string_split(allocations, ';'), ?)",
        [alloc_id],
    ).fetchone()
    if row is None or not row[0]:
        return None
    return list(row[0]), float(row[1]), float(row[2])


def _known_ids(con: Any) -> list[str]:
    return sorted(
        {
            tag
            for (tags,) in con.execute(
                "SELECT DISTINCT allocations FROM gpu WHERE allocations <> ''"
            ).fetchall()
            for tag in tags.split(";")
            if tag
        }
    )


def collect(
    paths: Iterable[Path],
    flt: ReportFilter | None = None,
    con: Any = None,
) -> Timeline:
    """Per-GPU decimated series and marks; with ``flt.allocation`` only that allocation's
    GPUs, from a little before it began to a little after it ended."""
    flt = flt or ReportFilter()
    con = con or duck.connect()
    fs = duck.find_files(list(paths))
    duck.load(con, fs, "gpu", ReportFilter(since=flt.since, until=flt.until, gpus=flt.gpus))
    where = "true"
    focus = None
    if flt.allocation is not None:
        extent = _allocation_extent(con, flt.allocation)
        if extent is None:
            raise UnknownAllocation(flt.allocation, _known_ids(con))
        gpus, first, last = extent
        pad = max(CONTEXT_MIN_S, CONTEXT_SHARE * (last - first))
        where = f"gpu IN ({', '.join(map(str, gpus))}) AND ts BETWEEN {first - pad!r} AND "
        where += f"{last + pad!r}"
        focus = (flt.allocation, first, last)
    gpu_rows: dict[int, _Gpu] = {
        idx: _Gpu(name=name or "")
        for idx, name in con.execute(
            f"SELECT gpu, arg_min(name, ts) FROM gpu WHERE {where} GROUP BY gpu"
        ).fetchall()
    }
    lo, hi = con.execute(f"SELECT min(ts), max(ts) FROM gpu WHERE {where}").fetchone()
    width = bucket_width(float(lo or 0.0), float(hi or 0.0), _interval(con, where))
    throttled = (
        f"CASE WHEN clock_event_reasons IS NULL THEN NULL "
        f"WHEN (clock_event_reasons & {THROTTLE_MASK}) <> 0 THEN 1.0 ELSE 0.0 END"
    )
    for idx, b, util, sm, power, temp, throttle in con.execute(
        f"SELECT gpu, floor(ts / {width!r})::BIGINT, avg(utilization_gpu_pct), "
        f"avg(sm_active_pct), avg(power_w), avg(temperature_c), avg({throttled}) "
        f"FROM gpu WHERE {where} GROUP BY ALL"
    ).fetchall():
        g = gpu_rows[idx]
        for series, value in (
            (g.rows, 0.0),
            (g.util, util),
            (g.sm, sm),
            (g.power, power),
            (g.temp, temp),
            (g.throttle, throttle),
        ):
            series.width = width
            if value is not None:
                series.buckets[int(b)] = [float(value), 1]
    spans: dict[int, dict[str, tuple[float, float]]] = {}
    for idx, alloc_id, first, last in con.execute(
        "SELECT gpu, id, min(ts), max(ts) FROM (SELECT ts, gpu, "
        "unnest(string_split(allocations, ';')) AS id FROM gpu "
        f"WHERE allocations <> '' AND {where}) WHERE id <> '' GROUP BY ALL"
    ).fetchall():
        spans.setdefault(idx, {})[alloc_id] = (first, last)
    pretrigger = [
        (float(a), float(b))
        for a, b in con.execute(
            f"SELECT min(ts), max(ts) FROM gpu WHERE pretrigger = '1' AND {where} GROUP BY fid"
        ).fetchall()
    ]
    duck.load(con, fs, "events", ReportFilter(since=flt.since, until=flt.until, gpus=flt.gpus))
    events = [
        (float(ts), int(gpu), f"Xid {xid}" if xid else str(event))
        for ts, gpu, event, xid in con.execute(
            f"SELECT ts, gpu, event, xid FROM events WHERE {where} ORDER BY ts"
        ).fetchall()
        if gpu in gpu_rows
    ]
    nodes = [n for (n,) in con.execute(f"SELECT DISTINCT node FROM gpu WHERE {where}").fetchall()]
    switches: list[tuple[float, bool]] = []
    if len(nodes) == 1 and lo is not None:
        dirs = {p.parent for p in fs.files["gpu"] if fs.nodes.get(p) == nodes[0]}
        logs = [p for p in fs.files["transitions"] if p.parent in dirs]
        switches = _switches(logs, float(lo), float(hi))
    return Timeline(gpu_rows, spans, events, pretrigger, focus, switches)


def _switches(logs: list[Path], first: float, last: float) -> list[tuple[float, bool]]:
    """Telemetry on/off switches between ``first`` and ``last`` from the agent's
    ``transitions.csv`` files ``logs`` (rotated copies included); unreadable rows and files are
    skipped, as the marks only annotate the rows."""
    import csv

    out: set[tuple[float, bool]] = set()
    for path in logs:
        try:
            with duck.open_text(path) as fh:
                for row in csv.DictReader(fh):
                    to_state = row.get("to_state")
                    if to_state not in ("telemetry_on", "telemetry_off"):
                        continue
                    try:
                        ts = parse_iso_utc(row.get("timestamp") or "").timestamp()
                    except ValueError:
                        continue
                    if first - 60 <= ts <= last + 60:
                        out.add((ts, to_state == "telemetry_on"))
        except (OSError, EOFError, UnicodeDecodeError, csv.Error):
            continue
    return sorted(out)[:MAX_MARKERS]


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


def _dt(x: float) -> datetime:
    return datetime.fromtimestamp(x, timezone.utc)


def _off_spans(series: _Series) -> list[tuple[float, float]]:
    """Stretches with no row at all (telemetry off, or rows lost), from the row buckets: two
    empty buckets or more (a bucket is at least one interval wide, so one late tick can empty
    one bucket but not two)."""
    out = []
    prev: int | None = None
    for idx in sorted(series.buckets):
        if prev is not None and idx > prev + 2:
            out.append(((prev + 1) * series.width, idx * series.width))
        prev = idx
    return out


def _runs(series: _Series) -> list[tuple[float, float, float]]:
    """Runs of adjacent buckets with a positive value: (start, end, mean value) — one shaded
    span per throttled stretch, not one per bucket."""
    runs: list[list[float]] = []  # [first index, last index, sum, count]
    current: list[float] | None = None
    for idx in sorted(series.buckets):
        value = series.buckets[idx][0]
        if value <= 0:
            current = None
        elif current is not None and idx == current[1] + 1:
            current[1] = idx
            current[2] += value
            current[3] += 1
        else:
            current = [idx, idx, value, 1]
            runs.append(current)
    w = series.width
    return [(a * w, (b + 1) * w, total / n) for a, b, total, n in runs]


def _markers(events: list[tuple[float, int, str]], gpu: int, width: float) -> list[Any]:
    """One marker per event label and time bucket, at most MAX_MARKERS."""
    seen: dict[tuple[int, str], tuple[float, str]] = {}
    for ts, g, label in events:
        if g == gpu:
            seen.setdefault((int(ts // width), label), (ts, label))
    return list(seen.values())[:MAX_MARKERS]


def figure(timeline: Timeline) -> Any:
    """The matplotlib Figure of a :class:`Timeline` (three axes per GPU panel)."""
    plt, mdates = _load_matplotlib()
    gpus = timeline.gpus
    if not gpus:
        raise ValueError("no GPU rows in the given files and time range")
    rows = len(gpus)
    fig, axes = plt.subplots(rows, 1, figsize=(12, 2.9 * rows + 0.9), sharex=True, squeeze=False)
    every = [g.rows for g in gpus.values()]
    lo = min(min(s.buckets) * s.width for s in every if s.buckets)
    hi = max((max(s.buckets) + 1) * s.width for s in every if s.buckets)
    if timeline.focus is not None:
        lo = min(lo, timeline.focus[1])
        hi = max(hi, timeline.focus[2])
    full = max(hi - lo, 1e-3)
    for ax, (idx, g) in zip(axes[:, 0], sorted(gpus.items()), strict=True):
        _panel(ax, idx, g, timeline, full)
        ax.set_xlim(_dt(lo), _dt(hi))
    handles: dict[str, Any] = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, h)
    fig.legend(
        list(handles.values()),
        list(handles.keys()),
        loc="upper center",
        ncol=min(5, max(1, len(handles))),
        fontsize=8,
        frameon=False,
    )
    axes[-1, 0].xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M:%S"))
    axes[-1, 0].set_xlabel("time (UTC)")
    top = 1 - 0.55 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def _panel(ax: Any, idx: int, g: _Gpu, timeline: Timeline, full: float) -> None:
    xs, ys = g.util.points()
    ax.plot([_dt(x) for x in xs], ys, color="tab:blue", lw=1.2, label=UTIL_LABEL, zorder=3)
    if g.sm.buckets:
        sx, sy = g.sm.points()
        ax.plot([_dt(x) for x in sx], sy, color="tab:cyan", lw=1, ls=":", label="SM active %")
    ax.set_ylim(0, 110)
    ax.set_ylabel(UTIL_LABEL, color="tab:blue")
    ax.set_title(f"GPU {idx} {g.name}".strip(), fontsize=9, loc="left")
    power = ax.twinx()
    px, py = g.power.points()
    power.plot([_dt(x) for x in px], py, color="tab:orange", lw=1, alpha=0.8, label=POWER_LABEL)
    power.set_ylabel(POWER_LABEL, color="tab:orange")
    power.set_ylim(bottom=0)
    temp = ax.twinx()
    temp.spines["right"].set_position(("axes", 1.07))
    qx, qy = g.temp.points()
    temp.plot([_dt(x) for x in qx], qy, color="tab:green", lw=1, ls="--", label=TEMP_LABEL)
    temp.set_ylabel(TEMP_LABEL, color="tab:green")
    # Utilization (and the marks) over the power and temperature lines: at 100 % the power line
    # would otherwise hide it.
    ax.set_zorder(temp.get_zorder() + 1)
    ax.patch.set_visible(False)
    # One list of shaded intervals (start, end, color, alpha, gid, legend label), drawn alike.
    spans: list[tuple[float, float, str, float, str, str]] = [
        (a, b, "tab:red", 0.1 + 0.15 * share, GID_THROTTLED, "throttled")
        for a, b, share in _runs(g.throttle)
    ]
    spans += [
        (a, b, "0.6", 0.25, GID_OFF, "no rows (telemetry off)") for a, b in _off_spans(g.rows)
    ]
    spans += [
        (a, b, "tab:purple", 0.12, GID_PRETRIGGER, "pre-trigger") for a, b in timeline.pretrigger
    ]
    if timeline.focus is not None:
        alloc_id, a, b = timeline.focus
        spans.append((a, b, "tab:olive", 0.08, GID_FOCUS, f"allocation {alloc_id}"))
    for a, b, color, alpha, gid, label in spans:
        ax.axvspan(_dt(a), _dt(b), color=color, alpha=alpha, lw=0, gid=gid, label=label)
    for alloc_id, (a, b) in sorted(timeline.spans.get(idx, {}).items(), key=lambda x: x[1]):
        ax.axvspan(
            _dt(a),
            _dt(b),
            ymin=0.93,
            ymax=1.0,
            color="tab:olive",
            alpha=0.7,
            lw=0,
            gid=GID_ALLOCATION,
            label="allocation (named on the band)",
        )
        if (b - a) >= LABEL_SHARE * full:
            ax.text(
                _dt((a + b) / 2),
                106,
                alloc_id,
                fontsize=7,
                ha="center",
                va="center",
                clip_on=True,
            )
    for ts, on in timeline.switches:
        ax.axvline(
            _dt(ts),
            color="tab:green" if on else "0.4",
            lw=1,
            ls=":",
            gid=GID_SWITCH,
            label="telemetry on" if on else "telemetry off",
        )
    for ts, label in _markers(timeline.events, idx, full / 2000):
        xid = label.startswith("Xid")
        line = ax.axvline(
            _dt(ts),
            color="crimson" if xid else "tab:brown",
            lw=1.2,
            ls="-",
            zorder=4,
            label="Xid" if xid else "GPU event",
        )
        line.set_gid(GID_EVENT)
        ax.text(_dt(ts), 101, f" {label}", fontsize=7, color=line.get_color(), va="bottom")


def plot(paths: Iterable[Path], output: Path, flt: ReportFilter | None = None) -> int:
    """Write the figure to ``output`` (PNG, SVG or PDF by suffix); returns the GPU count."""
    plt, _ = _load_matplotlib()
    timeline = collect(paths, flt)
    fig = figure(timeline)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return len(timeline.gpus)


_SVG_HEAD = re.compile(r"^.*?(?=<svg)", re.S)
_SVG_METADATA = re.compile(r"<metadata>.*?</metadata>", re.S)


def svg(paths: Iterable[Path], flt: ReportFilter | None = None) -> str:
    """The figure as an inline ``<svg>`` element: no XML prolog, DOCTYPE or metadata, so a
    page embedding it names no outside resource."""
    plt, _ = _load_matplotlib()
    fig = figure(collect(paths, flt))
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return _SVG_METADATA.sub("", _SVG_HEAD.sub("", buf.getvalue(), count=1))
