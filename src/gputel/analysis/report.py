"""``gputel report``: what the GPUs did, per session, per GPU and per allocation, from the CSVs.

The rows are loaded into DuckDB (:mod:`gputel.analysis.duck`) and summed there; Python only
walks the few per-file and per-scope results.

A *session* is one telemetry run of the recorder. The recorder starts a new file per session and
also rolls files over at a UTC day change or a size cap; a file whose first row follows the
previous file's last row within a few intervals continues that session, anything later starts a
new one. Files of different nodes (the part of the name after the timestamp) never mix.

Energy (one rule, in ``_ROWS_SQL``): ``energy_j`` counts joules since its file began, so within a
file a GPU's energy is the counter's rise between consecutive rows (never negative); between
two files of one session, where the counter restarts, it is power integrated over the one
interval between them (trapezoid, only across a gap no longer than the session's continuation
gap). A session's energy per GPU is therefore the sum over its files of (last − first) plus those
joins. An allocation's energy is the sum of the same per-row rises over the rows it is tagged on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter
from gputel.schema import CLOCK_EVENT_REASONS, THROTTLE_MASK

JOULES_PER_KWH = 3.6e6
#: GPU utilization at or above which a GPU is busy while its SM activity under
#: ``STALLED_SM_PCT`` means it waits (memory, I/O, host): "busy but stalled" seconds.
STALLED_UTIL_PCT = 50.0
STALLED_SM_PCT = 20.0


def host_key(path: Path) -> str:
    """The node part of a recorder file name (``gpu-20261122T034512Z-node01.csv`` → node01)."""
    return duck.node_of(path)


def _interval_from(spacings: Counter[float]) -> float | None:
    """The recording interval: the most common spacing between ticks (smallest on a tie)."""
    if not spacings:
        return None
    top = max(spacings.values())
    return min(s for s, n in spacings.items() if n == top)


def _missing(spacings: Counter[float], interval: float | None) -> int:
    if not interval:
        return 0
    return sum((round(d / interval) - 1) * n for d, n in spacings.items() if d > 1.5 * interval)


def _continuation_gap(spacings: Counter[float]) -> float:
    interval = _interval_from(spacings) or 1.0
    return max(2.5 * interval, 2.0)


def _percentile(bins: dict[int, int], q: float) -> float | None:
    """Utilization percentile from a 0.1 %-wide histogram: the first bin reaching rank q·n."""
    n = sum(bins.values())
    if not n:
        return None
    rank = q / 100 * n
    seen = 0
    for b in sorted(bins):
        seen += bins[b]
        if seen >= rank:
            return b / 10
    return 100.0


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _pretrigger_s(
    head: tuple[float | None, float | None] | None, last: float, interval: float | None
) -> float:
    """How long before the recorder's first own row the session's pre-trigger head begins."""
    head_first, own_first = head or (None, None)
    if head_first is None:
        return 0.0
    if own_first is None:  # the recorder never got to its own first row
        return _round(last - head_first + (interval or 0.0)) or 0.0
    return _round(max(0.0, own_first - head_first)) or 0.0


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import datetime, timezone

    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


@dataclass
class _FileSpan:
    fid: int
    node: str
    path: str
    first: float
    last: float
    spacings: Counter[float] = field(default_factory=Counter)


def assign_sessions(con: Any, table: str, kind: str | None = None) -> list[list[_FileSpan]]:
    """Group the files of ``table`` into sessions; writes ``{kind}_sessions(fid, sid, max_gap)``.

    Files are walked per node in time order; the continuation gap grows with the interval seen
    so far in the session (the most common spacing of its distinct ticks).
    """
    spans: dict[int, _FileSpan] = {}
    for fid, node, path, first, last in con.execute(
        f"SELECT t.fid, f.node, f.path, min(t.ts), max(t.ts) FROM {table} t "
        f"JOIN {table}_files f USING (fid) GROUP BY ALL ORDER BY t.fid"
    ).fetchall():
        spans[fid] = _FileSpan(fid, node, path, first, last)
    for fid, step, n in con.execute(
        f"SELECT fid, s, count(*) FROM (SELECT fid, "
        f"round_even(ts - lag(ts) OVER (PARTITION BY fid ORDER BY ts), 3) AS s "
        f"FROM (SELECT DISTINCT fid, ts FROM {table})) WHERE s > 0 GROUP BY ALL"
    ).fetchall():
        spans[fid].spacings[step] += n
    by_node: dict[str, list[_FileSpan]] = {}
    for span in sorted(spans.values(), key=lambda s: s.path):
        by_node.setdefault(span.node, []).append(span)
    sessions: list[list[_FileSpan]] = []
    rows: list[tuple[int, int, float]] = []
    for entries in by_node.values():
        entries.sort(key=lambda s: (s.first, s.path))
        current: list[_FileSpan] | None = None
        spacing: Counter[float] = Counter()
        last = 0.0
        for span in entries:
            if current is None or span.first - last > _continuation_gap(spacing):
                current = []
                sessions.append(current)
                spacing = Counter()
                last = span.last
            elif span.first > last:
                spacing[round(span.first - last, 3)] += 1
            rows.append((span.fid, len(sessions), _continuation_gap(spacing)))
            spacing.update(span.spacings)
            current.append(span)
            last = max(last, span.last)
    kind = kind or table
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {kind}_sessions (fid INTEGER, sid INTEGER, max_gap DOUBLE)"
    )
    if rows:
        con.executemany(f"INSERT INTO {kind}_sessions VALUES (?, ?, ?)", rows)
    return sessions


#: Per-row GPU table ``r``, made while the files are read: tick spacing per GPU and the energy
#: of the interval ending at each row, within its file (the energy rule in the module docstring:
#: the counter's rise, or power integrated where a file has no counter; ``delta_p`` is applied
#: only across spacings within the session's continuation gap). A file's first rows get their
#: spacing and energy from the session's previous file afterwards (:func:`_join_files`).
_ROWS_SQL = """
SELECT fid, gpu, ts,
       utilization_gpu_pct AS util, memory_used_mib AS mem, temperature_c AS temp,
       power_w AS power, clock_event_reasons AS reasons, lost = '1' AS lost,
       allocations AS alloc, sm_active_pct AS sm, tensor_active_pct AS tensor, uuid, name,
       coalesce(pretrigger = '1', false) AS head,
       ts - lag(ts) OVER w AS spacing,
       CASE WHEN energy_j IS NOT NULL AND lag(energy_j) OVER w IS NOT NULL
            THEN greatest(0.0, energy_j - lag(energy_j) OVER w) END AS delta_e,
       CASE WHEN power_w IS NOT NULL AND lag(power_w) OVER w IS NOT NULL
            THEN (power_w + lag(power_w) OVER w) / 2 * (ts - lag(ts) OVER w) END AS delta_p
FROM ({inner})
WINDOW w AS (PARTITION BY fid, gpu ORDER BY ts)
"""

#: The rows of ``r`` with their session, node and energy: the view every GPU query reads.
_VIEW_SQL = """
CREATE OR REPLACE TEMP VIEW rv AS
SELECT r.* EXCLUDE (delta_e, delta_p, uuid, name), m.sid, f.node,
       coalesce(r.delta_e, CASE WHEN r.spacing > 0 AND r.spacing <= m.max_gap
                                THEN r.delta_p END) AS delta
FROM r JOIN gpu_sessions m USING (fid) JOIN r_files f USING (fid)
"""

#: First uuid and model name of each GPU in each session.
_IDENTITY_SQL = """
CREATE OR REPLACE TEMP TABLE ident AS
SELECT m.sid, r.gpu, arg_min(r.uuid, r.ts) AS uuid, arg_min(r.name, r.ts) AS name
FROM r JOIN gpu_sessions m USING (fid) GROUP BY ALL
"""


def _join_files(con: Any, sessions: list[list[_FileSpan]]) -> None:
    """Spacing and energy of each file's first row per GPU, from the session's previous rows.

    Across a file boundary the energy counter restarts, so the interval between the last row
    before and the first row of the file counts as power integrated over it (trapezoid).
    """
    ends: dict[int, dict[int, tuple[tuple[float, float | None], tuple[float, float | None]]]] = {}
    for fid, gpu, t0, p0, t1, p1 in con.execute(
        "SELECT fid, gpu, min(ts), arg_min_null(power, ts), max(ts), arg_max_null(power, ts) "
        "FROM r GROUP BY ALL"
    ).fetchall():
        ends.setdefault(fid, {})[gpu] = ((t0, p0), (t1, p1))
    fixes: list[tuple[int, int, float, float, float | None]] = []
    for files in sessions:
        seen: dict[int, tuple[float, float | None]] = {}
        for span in files:
            for gpu, (first, last) in sorted(ends.get(span.fid, {}).items()):
                prev = seen.get(gpu)
                if prev is not None and first[0] >= prev[0]:
                    dt = first[0] - prev[0]
                    energy = (
                        (first[1] + prev[1]) / 2 * dt
                        if first[1] is not None and prev[1] is not None
                        else None
                    )
                    fixes.append((span.fid, gpu, first[0], dt, energy))
                if prev is None or last[0] >= prev[0]:
                    seen[gpu] = last
    con.execute(
        "CREATE OR REPLACE TEMP TABLE joins (fid INTEGER, gpu INTEGER, ts DOUBLE, "
        "spacing DOUBLE, delta_p DOUBLE)"
    )
    if fixes:
        con.executemany("INSERT INTO joins VALUES (?, ?, ?, ?, ?)", fixes)
        con.execute(
            "UPDATE r SET spacing = j.spacing, delta_p = j.delta_p FROM joins j "
            "WHERE r.fid = j.fid AND r.gpu = j.gpu AND r.ts = j.ts"
        )


#: Rows tagged with an allocation, one per (row, allocation id), with the per-(node, allocation,
#: GPU) spacing that gap detection and idle stretches need.
_ALLOC_ROWS_SQL = """
CREATE OR REPLACE TEMP TABLE a AS
SELECT *, ts - lag(ts) OVER (PARTITION BY node, alloc_id, gpu ORDER BY ts) AS alloc_spacing
FROM (
  SELECT * EXCLUDE (alloc, spacing), unnest(string_split(alloc, ';')) AS alloc_id
  FROM rv WHERE alloc IS NOT NULL AND alloc <> ''
) WHERE alloc_id <> '' {only}
"""


def _stats_sql(source: str, keys: str, spacing: str) -> tuple[str, str, str]:
    bits = ", ".join(
        f"count(*) FILTER (WHERE reasons & {bit} <> 0) AS t_{name}"
        for bit, name in CLOCK_EVENT_REASONS
    )
    main = (
        f"SELECT {keys}, count(*), min(ts), max(ts), avg(util), max(util), max(mem), max(temp), "
        f"sum(delta), count(delta), avg(power), max(power), count(*) FILTER (WHERE lost), "
        f"avg(sm), avg(tensor), count(*) FILTER (WHERE util >= {STALLED_UTIL_PCT} "
        f"AND sm < {STALLED_SM_PCT}), list(DISTINCT gpu ORDER BY gpu), {bits}, "
        f"count(*) FILTER (WHERE reasons & {THROTTLE_MASK} <> 0) "
        f"FROM {source} GROUP BY ALL"
    )
    hist = (
        f"SELECT {keys}, least(1000, greatest(0, round_even(util * 10, 0)))::INTEGER AS b, "
        f"count(*) FROM {source} WHERE util IS NOT NULL GROUP BY ALL"
    )
    spacings = (
        f"SELECT {keys}, round_even({spacing}, 3) AS s, count(*) FROM {source} "
        f"WHERE {spacing} IS NOT NULL GROUP BY ALL"
    )
    return main, hist, spacings


@dataclass
class ScopeStats:
    """Aggregates of one scope (a GPU in a session, or an allocation), from DuckDB."""

    values: tuple[Any, ...]
    bins: dict[int, int] = field(default_factory=dict)
    spacings: Counter[float] = field(default_factory=Counter)

    @property
    def gpus(self) -> list[int]:
        return list(self.values[15])

    @property
    def first(self) -> float:
        return float(self.values[1])

    @property
    def last(self) -> float:
        return float(self.values[2])

    def to_dict(self, interval: float | None) -> dict[str, Any]:
        (n, first, last, util_mean, util_max, mem, temp, energy, energy_n, power_mean) = (
            self.values[:10]
        )
        power_peak, lost, sm, tensor, stalled = self.values[10:15]
        interval = interval or _interval_from(self.spacings)
        throttle = self.values[16:-1]
        throttled = self.values[-1]
        known = energy_n > 0
        return {
            "samples": n,
            "missing": _missing(self.spacings, interval),
            "lost_samples": lost,
            "duration_s": _round(last - first + (interval or 0.0)),
            "util_mean_pct": _round(util_mean),
            "util_p95_pct": _percentile(self.bins, 95),
            "util_max_pct": util_max,
            "memory_peak_mib": mem,
            "temperature_max_c": temp,
            "energy_j": _round(energy if known else None),
            "energy_kwh": _round(energy / JOULES_PER_KWH if known else None, 6),
            "power_mean_w": _round(power_mean),
            "power_peak_w": power_peak,
            "throttle_s": {
                name: _round(count * interval) if interval else None
                for (_, name), count in sorted(
                    zip(CLOCK_EVENT_REASONS, throttle, strict=True), key=lambda x: x[0][1]
                )
                if count
            },
            "throttled_s": _round(throttled * interval) if interval else None,
            "sm_active_mean_pct": _round(sm),
            "tensor_active_mean_pct": _round(tensor),
            "stalled_s": _round(stalled * interval) if interval and sm is not None else None,
        }


def scope_stats(
    con: Any, source: str, keys: str, spacing: str
) -> dict[tuple[Any, ...], ScopeStats]:
    """Per-key aggregates of ``source`` (a table of GPU rows), keyed by the ``keys`` columns."""
    nkeys = len(keys.split(","))
    main, hist, spacings = _stats_sql(source, keys, spacing)
    out: dict[tuple[Any, ...], ScopeStats] = {}
    for row in con.execute(main).fetchall():
        out[tuple(row[:nkeys])] = ScopeStats(tuple(row[nkeys:]))
    for row in con.execute(hist).fetchall():
        out[tuple(row[:nkeys])].bins[row[nkeys]] = row[nkeys + 1]
    for row in con.execute(spacings).fetchall():
        out[tuple(row[:nkeys])].spacings[row[nkeys]] += row[nkeys + 1]
    return out


def _host_sessions(con: Any) -> list[tuple[str, dict[str, Any], float, float]]:
    """Per host-file session: (node, host_stats, first, last)."""
    sessions = assign_sessions(con, "host")
    if not sessions:
        return []
    con.execute(
        """
        CREATE OR REPLACE TEMP TABLE hr AS
        SELECT s.sid, h.ts, h.cpu_util_pct AS cpu,
               h.ts - lag(h.ts) OVER (PARTITION BY s.sid ORDER BY h.ts) AS spacing,
               CASE
                 WHEN h.cpu_package_energy_j IS NOT NULL
                      AND lag(h.cpu_package_energy_j) OVER f IS NOT NULL
                   THEN greatest(0.0, h.cpu_package_energy_j - lag(h.cpu_package_energy_j) OVER f)
                 WHEN h.cpu_package_power_w IS NOT NULL
                      AND lag(h.cpu_package_power_w) OVER f IS NOT NULL
                   THEN (h.cpu_package_power_w + lag(h.cpu_package_power_w) OVER f) / 2
                        * (h.ts - lag(h.ts) OVER f)
               END AS delta
        FROM host h JOIN host_sessions s USING (fid)
        WINDOW f AS (PARTITION BY h.fid ORDER BY h.ts)
        """
    )
    stats: dict[int, list[Any]] = {}
    for sid, n, first, last, cpu, energy, energy_n in con.execute(
        "SELECT sid, count(*), min(ts), max(ts), avg(cpu), sum(delta), count(delta) "
        "FROM hr GROUP BY sid"
    ).fetchall():
        stats[sid] = [n, first, last, cpu, energy if energy_n else None, Counter()]
    for sid, s, n in con.execute(
        "SELECT sid, round_even(spacing, 3), count(*) FROM hr WHERE spacing IS NOT NULL "
        "GROUP BY ALL"
    ).fetchall():
        stats[sid][5][s] += n
    out = []
    for sid, files in enumerate(sessions, 1):
        if sid not in stats:
            continue
        n, first, last, cpu, energy, spacings = stats[sid]
        interval = _interval_from(spacings)
        host_dict = {
            "samples": n,
            "missing": _missing(spacings, interval),
            "cpu_util_mean_pct": _round(cpu),
            "rapl_energy_j": _round(energy),
            "interval_s": interval,
        }
        out.append((files[0].node, host_dict, first, last))
    return out


def _load_all(con: Any, paths: list[Path], flt: ReportFilter) -> duck.FileSet:
    fs = duck.find_files(paths)
    duck.load(con, fs, "gpu", flt, table="r", wrap=lambda inner: _ROWS_SQL.format(inner=inner))
    duck.load(con, fs, "host", flt if flt.allocation is None else ReportFilter(since=1, until=0))
    duck.load(con, fs, "events", flt)
    return fs


def build_report(
    paths: list[Path] | tuple[Path, ...],
    flt: ReportFilter | None = None,
    idle_util: float = 5.0,
    idle_minutes: float = 30.0,
    con: Any = None,
) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
    from gputel.analysis import fleet

    flt = flt or ReportFilter()
    con = con or duck.connect()
    _load_all(con, list(paths), flt)
    gpu_sessions = assign_sessions(con, "r", "gpu")
    _join_files(con, gpu_sessions)
    con.execute(_VIEW_SQL)
    con.execute(_IDENTITY_SQL)

    per_gpu = scope_stats(con, "rv", "sid, gpu", "spacing")
    heads = {
        sid: (head_first, own_first)
        for sid, head_first, own_first in con.execute(
            "SELECT sid, min(ts) FILTER (WHERE head), min(ts) FILTER (WHERE NOT head) "
            "FROM rv GROUP BY sid"
        ).fetchall()
    }
    identity = {
        (sid, gpu): (uuid or "", name or "")
        for sid, gpu, uuid, name in con.execute("SELECT * FROM ident").fetchall()
    }
    session_spacing: dict[int, Counter[float]] = {}
    for (sid, _gpu), st in per_gpu.items():
        session_spacing.setdefault(sid, Counter()).update(st.spacings)
    intervals = {sid: _interval_from(c) for sid, c in session_spacing.items()}
    con.execute("CREATE OR REPLACE TEMP TABLE sess (sid INTEGER, node VARCHAR, interval DOUBLE)")
    rows = [
        (sid, files[0].node, intervals.get(sid) or 1.0) for sid, files in enumerate(gpu_sessions, 1)
    ]
    if rows:
        con.executemany("INSERT INTO sess VALUES (?, ?, ?)", rows)
    only = "" if flt.allocation is None else f"AND alloc_id = {duck.quote(flt.allocation)}"
    con.execute(_ALLOC_ROWS_SQL.format(only=only))

    events = fleet.EventCounts(con)
    out_sessions: list[dict[str, Any]] = []
    if flt.allocation is None:
        hosts = _host_sessions(con)
        used: set[int] = set()
        for sid, files in enumerate(gpu_sessions, 1):
            gpus = sorted(g for (s, g) in per_gpu if s == sid)
            if not gpus:
                continue
            node = files[0].node
            first = min(per_gpu[(sid, g)].first for g in gpus)
            last = max(per_gpu[(sid, g)].last for g in gpus)
            match = None
            best = 0.0
            for i, (h, _hd, h_first, h_last) in enumerate(hosts):
                if h != node or i in used:
                    continue
                overlap = min(h_last, last) - max(h_first, first)
                if overlap >= best:
                    best, match = overlap, i
            host_dict = None
            if match is not None:
                used.add(match)
                host_dict = {k: v for k, v in hosts[match][1].items() if k != "interval_s"}
            interval = intervals.get(sid)
            gpus_out = []
            for gpu in gpus:
                uuid, name = identity.get((sid, gpu), ("", ""))
                d = per_gpu[(sid, gpu)].to_dict(interval)
                gpus_out.append({"gpu": gpu, "uuid": uuid, "name": name, **d})
            out_sessions.append(
                {
                    "session": len(out_sessions) + 1,
                    "host": node,
                    "start": _iso(first),
                    "end": _iso(last),
                    "duration_s": _round(last - first + (interval or 0.0)),
                    "pretrigger_s": _pretrigger_s(heads.get(sid), last, interval),
                    "interval_s": interval,
                    "files": [f.path for f in files],
                    "gpus": gpus_out,
                    "host_stats": host_dict,
                    "events": events.between(node, first, last + (interval or 0.0)),
                }
            )
        for i, (h, hd, h_first, h_last) in enumerate(hosts):
            if i not in used:
                out_sessions.append(
                    {
                        "session": len(out_sessions) + 1,
                        "host": h,
                        "start": _iso(h_first),
                        "end": _iso(h_last),
                        "duration_s": None,
                        "interval_s": hd["interval_s"],
                        "files": [],
                        "gpus": [],
                        "host_stats": {k: v for k, v in hd.items() if k != "interval_s"},
                        "events": events.between(h, h_first, h_last),
                    }
                )
    per_alloc = scope_stats(con, "a", "alloc_id", "alloc_spacing")
    alloc_nodes: dict[str, list[str]] = {}
    for alloc_id, node in con.execute(
        "SELECT DISTINCT alloc_id, node FROM a ORDER BY ALL"
    ).fetchall():
        alloc_nodes.setdefault(alloc_id, []).append(node)
    alloc_list = []
    for (alloc_id,), st in sorted(per_alloc.items()):
        d = st.to_dict(None)
        alloc_list.append(
            {
                "id": alloc_id,
                **d,
                "gpus": st.gpus,
                "start": _iso(st.first),
                "end": _iso(st.last),
                "nodes": alloc_nodes.get(alloc_id, []),
                "events": events.for_allocation(alloc_id),
            }
        )
    report: dict[str, Any] = {"sessions": out_sessions, "allocations": alloc_list}
    report.update(fleet.fleet_summary(con, idle_util, idle_minutes))
    return report


CSV_COLUMNS = (
    "scope",
    "session",
    "id",
    "gpu",
    "start",
    "end",
    "duration_s",
    "samples",
    "missing",
    "util_mean_pct",
    "util_p95_pct",
    "util_max_pct",
    "memory_peak_mib",
    "temperature_max_c",
    "energy_j",
    "energy_kwh",
    "power_mean_w",
    "power_peak_w",
    "throttle_s",
    "cpu_util_mean_pct",
    "rapl_energy_j",
)


def report_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a report into rows with ``CSV_COLUMNS`` (for ``--csv``)."""
    rows: list[dict[str, Any]] = []

    def throttle(d: dict[str, Any]) -> str:
        return ";".join(f"{k}={v:g}" for k, v in d.get("throttle_s", {}).items() if v is not None)

    for s in report["sessions"]:
        host = s.get("host_stats") or {}
        rows.append(
            {
                "scope": "session",
                "session": s["session"],
                "start": s["start"],
                "end": s["end"],
                "duration_s": s["duration_s"],
                "samples": host.get("samples"),
                "missing": host.get("missing"),
                "cpu_util_mean_pct": host.get("cpu_util_mean_pct"),
                "rapl_energy_j": host.get("rapl_energy_j"),
            }
        )
        for g in s["gpus"]:
            rows.append(
                {
                    "scope": "gpu",
                    "session": s["session"],
                    "id": g["uuid"],
                    "gpu": g["gpu"],
                    **{k: g[k] for k in CSV_COLUMNS if k in g and k != "throttle_s"},
                    "throttle_s": throttle(g),
                }
            )
    for a in report["allocations"]:
        rows.append(
            {
                "scope": "allocation",
                "id": a["id"],
                "gpu": ";".join(str(g) for g in a["gpus"]),
                **{k: a[k] for k in CSV_COLUMNS if k in a and k not in ("throttle_s", "gpu")},
                "throttle_s": throttle(a),
            }
        )
    return rows
