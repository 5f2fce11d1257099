"""``gputel replay``: run the agent's own state machine over recorded utilization.

An operator tuning ``/etc/default/gputel`` wants to know, from real data, when telemetry would
have started and stopped under other thresholds and how much of the busy time it would have
caught. This feeds recorded per-tick utilization (the maximum over the selected GPUs, exactly as
the agent computes it) through :func:`gputel.supervisor.states.step` - the same code, not a copy.

Where the recording has a gap (telemetry was off, or rows are missing) the agent's reading is
unknown, so replay feeds a single missing reading at the first absent tick, which is what the live
agent does with a reading that hit its deadline: it breaks any pending condition.

``GPUTEL_ACTIVITY=sm`` (``--activity sm``) replays GPM's SM activity (``sm_active_pct``) where a
row has it and the row's utilization elsewhere, by the agent's own rule (``gputel.activity``).
MIG instances (``mig-*.csv``) are not replayed: their GPUs' rows carry no activity.
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gputel.activity import pick
from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter
from gputel.analysis.groups import GAP_INTERVALS
from gputel.formats import iso_utc_ms
from gputel.supervisor.states import ActivityState, Machine, Thresholds, Transition, step


@dataclass
class UtilSeries:
    """Per-tick utilization: parallel arrays of timestamps and max utilization (NaN = none)."""

    ts: array
    util: array
    interval: float


def load_series(
    paths: Iterable[Path],
    flt: ReportFilter | None = None,
    con: Any = None,
    activity: str = "utilization",
) -> UtilSeries:
    """Max activity per tick over the selected GPUs, in time order, from ``gpu-*.csv``:
    utilization, or with ``activity="sm"`` each row's SM activity where it has one.

    A tick recorded twice (overlapping files) counts once; the interval is the median spacing.
    """
    flt = flt or ReportFilter()
    con = con or duck.connect()
    duck.load(
        con,
        duck.find_files(list(paths)),
        "gpu",
        flt,
        wrap=lambda inner: (
            f"SELECT node, gpu, ts, utilization_gpu_pct, sm_active_pct FROM ({inner})"
        ),
    )
    ts_out = array("d")
    util_out = array("d")
    nan = float("nan")
    # The rule picks per row (a row twice, from overlapping files, changes no maximum); a GPU
    # has GPM when any of its rows has SM activity.
    rows = con.execute(
        "SELECT ts, utilization_gpu_pct, sm_active_pct, "
        "count(sm_active_pct) OVER (PARTITION BY node, gpu) > 0 FROM gpu ORDER BY ts"
    ).fetchall()
    for ts, group in itertools.groupby(rows, key=lambda row: row[0]):
        known = [v for _, u, sm, gpm in group if (v := pick(u, sm, gpm, activity)) is not None]
        ts_out.append(ts)
        util_out.append(max(known) if known else nan)
    spacings = sorted(b - a for a, b in itertools.pairwise(ts_out) if b > a)
    interval = spacings[len(spacings) // 2] if spacings else 1.0
    return UtilSeries(ts_out, util_out, interval)


@dataclass
class ReplayResult:
    thresholds: Thresholds
    transitions: list[Transition]
    telemetry_spans: list[tuple[float, float]]
    busy_s: float
    captured_busy_s: float
    recorded_s: float

    @property
    def capture_ratio(self) -> float | None:
        return self.captured_busy_s / self.busy_s if self.busy_s else None

    def to_dict(self) -> dict[str, Any]:
        th = self.thresholds
        return {
            "thresholds": {
                "start_util_pct": th.start_util_pct,
                "start_seconds": th.start_seconds,
                "stop_util_pct": th.stop_util_pct,
                "stop_seconds": th.stop_seconds,
            },
            "transitions": [
                {
                    "at": iso_utc_ms(t.at),
                    "from_state": t.from_state.value,
                    "to_state": t.to_state.value,
                    "reason": t.reason,
                }
                for t in self.transitions
            ],
            "telemetry_spans": [
                {"start": iso_utc_ms(a), "end": iso_utc_ms(b)} for a, b in self.telemetry_spans
            ],
            "starts": len(self.telemetry_spans),
            "busy_s": round(self.busy_s, 3),
            "captured_busy_s": round(self.captured_busy_s, 3),
            "capture_ratio": None if self.capture_ratio is None else round(self.capture_ratio, 4),
            "recorded_s": round(self.recorded_s, 3),
        }


_ON = (ActivityState.ACTIVE, ActivityState.COOLING)


def replay(series: UtilSeries, th: Thresholds) -> ReplayResult:
    """Run the state machine over ``series``; busy means utilization ≥ the start threshold."""
    interval = series.interval
    gap = GAP_INTERVALS * interval
    machine: Machine | None = None
    transitions: list[Transition] = []
    spans: list[tuple[float, float]] = []
    on_since: float | None = None
    busy = captured = recorded = 0.0
    prev_ts: float | None = None
    for ts, u in zip(series.ts, series.util, strict=True):
        util = None if u != u else u
        if machine is None:
            machine = Machine(ActivityState.IDLE, ts)
        elif prev_ts is not None and ts - prev_ts > gap:
            machine, tr = step(machine, None, prev_ts + interval, th)
            if tr:
                transitions.append(tr)
        machine, tr = step(machine, util, ts, th)
        if tr:
            transitions.append(tr)
        on = machine.state in _ON
        if on and on_since is None:
            on_since = ts
        elif not on and on_since is not None:
            spans.append((on_since, ts))
            on_since = None
        if util is not None and util >= th.start_util_pct:
            busy += interval
            if on:
                captured += interval
        if on:
            recorded += interval
        prev_ts = ts
    if on_since is not None and prev_ts is not None:
        spans.append((on_since, prev_ts + interval))
    return ReplayResult(th, transitions, spans, busy, captured, recorded)


SWEEP_START_UTIL = (10.0, 20.0, 40.0)
SWEEP_START_SECONDS = (1.0, 5.0, 15.0)
SWEEP_STOP_SECONDS = (5.0, 15.0, 60.0)


def sweep(series: UtilSeries, base: Thresholds) -> list[ReplayResult]:
    """Replay a small grid around ``base``: start util × start seconds × stop seconds."""
    out = []
    for su, ss, ps in itertools.product(SWEEP_START_UTIL, SWEEP_START_SECONDS, SWEEP_STOP_SECONDS):
        th = Thresholds(su, ss, min(base.stop_util_pct, su), ps)
        out.append(replay(series, th))
    return out
