"""``gputel report``: what the GPUs did, per session, per GPU and per allocation, from the CSVs.

The rows are read once into DuckDB as per-minute groups (:mod:`gputel.analysis.groups`); the
figures are sums over those groups, and Python only walks per-file and per-scope results and the
allocation chains.

A *session* is one telemetry run of the recorder. The recorder starts a new file per session and
also rolls files over at a UTC day change or a size cap; a file whose first row follows the
previous file's last row within a few intervals continues that session, anything later starts a
new one. Files of different nodes (the part of the name after the timestamp) never mix.

Energy (one rule, ``gputel.energy`` rule 4, which the recorder also follows tick by tick for
the release reply and ``allocations.csv``): ``energy_j`` counts joules since its file began, a
restarted counter's interval already counted as power × interval by the recorder, so within a
file a GPU's energy is the counter's rise (:func:`groups.file_energy`); between two files of one
session, where the counter restarts, it is power integrated over the one interval between them
(trapezoid, only across a gap no longer than the session's continuation gap). A session's energy
per GPU is therefore the sum over its files of (last − first) plus those joins. Each row stands
for the interval that ends at it, so an allocation's energy is the counter's rise over the rows it
is tagged on, each run of them counted from the row before it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.analysis import duck, groups
from gputel.analysis.filter import ReportFilter
from gputel.analysis.groups import is_gap
from gputel.energy import continuation_gap, trapezoid
from gputel.schema import CLOCK_EVENT_REASONS

JOULES_PER_KWH = groups.JOULES_PER_KWH


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
    return sum((round(d / interval) - 1) * n for d, n in spacings.items() if is_gap(d, interval))


def _continuation_gap(spacings: Counter[float]) -> float:
    return continuation_gap(_interval_from(spacings) or 1.0)


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
    from gputel.formats import iso_utc_ms

    return None if ts is None else iso_utc_ms(ts)


@dataclass
class _FileSpan:
    fid: int
    node: str
    path: str
    first: float
    last: float
    spacings: Counter[float] = field(default_factory=Counter)
    #: The continuation gap in force when this file joined its session.
    max_gap: float = 0.0


#: Spacings that bucket groups show: each group's first spacing and the spacing from the
#: previous group of the same GPU within ``part`` (the file, or the session).
_SPACINGS_SQL = """
SELECT {part}, gpu, s, count(*) FROM (
  SELECT {part}, gpu, round_even(head[2] - head[1], 3) AS s FROM {chain} WHERE len(head) = 2
  UNION ALL
  SELECT {part}, gpu, round_even(t0 - lag(t1) OVER (PARTITION BY {part}, gpu ORDER BY t0, fid), 3)
  FROM {chain}
) WHERE s > 0 GROUP BY ALL
"""


def assign_sessions(con: Any, buckets: str, files: str, kind: str) -> list[list[_FileSpan]]:
    """Group the files of ``buckets`` into sessions; writes ``{kind}_sessions(fid, sid, max_gap)``.

    Files are walked per node in time order; the continuation gap grows with the interval seen
    so far in the session (the most common spacing of its ticks).
    """
    spans: dict[int, _FileSpan] = {}
    for fid, node, path, first, last in con.execute(
        f"SELECT x.fid, f.node, f.path, min(x.t0), max(x.t1) FROM {buckets} x "
        f"JOIN {files} f USING (fid) GROUP BY ALL ORDER BY x.fid"
    ).fetchall():
        spans[fid] = _FileSpan(fid, node, path, first, last)
    for fid, _gpu, step, n in con.execute(
        _SPACINGS_SQL.format(part="fid", chain=buckets)
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
            span.max_gap = _continuation_gap(spacing)
            rows.append((span.fid, len(sessions), span.max_gap))
            spacing.update(span.spacings)
            current.append(span)
            last = max(last, span.last)
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {kind}_sessions (fid INTEGER, sid INTEGER, max_gap DOUBLE)"
    )
    if rows:
        con.executemany(f"INSERT INTO {kind}_sessions VALUES (?, ?, ?)", rows)
    return sessions


def _session_chain(con: Any, buckets: str, kind: str) -> dict[tuple[int, int], Counter[float]]:
    """Per (session, GPU) spacings; writes ``{kind}_chain``, the buckets in session order."""
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {kind}_chain AS "
        f"SELECT m.sid, x.fid, x.gpu, x.n, x.t0, x.t1, x.head, "
        f"x.t0 - lag(x.t1) OVER (PARTITION BY m.sid, x.gpu ORDER BY x.t0, x.fid) AS d "
        f"FROM {buckets} x JOIN {kind}_sessions m USING (fid)"
    )
    out: dict[tuple[int, int], Counter[float]] = {}
    for sid, gpu, step, n in con.execute(
        _SPACINGS_SQL.format(part="sid", chain=f"{kind}_chain")
    ).fetchall():
        out.setdefault((sid, gpu), Counter())[step] += n
    return out


def _session_missing(
    con: Any, kind: str, intervals: dict[int, float | None]
) -> dict[tuple[int, int], int]:
    """Ticks missing per (session, GPU): inside each bucket (the grid its first and last row
    span, less its rows) and between buckets (spacings over 1.5 intervals)."""
    con.execute(f"CREATE OR REPLACE TEMP TABLE {kind}_iv (sid INTEGER, i DOUBLE)")
    known = [(sid, i) for sid, i in intervals.items() if i]
    if known:
        con.executemany(f"INSERT INTO {kind}_iv VALUES (?, ?)", known)
    return {
        (sid, gpu): int(missing)
        for sid, gpu, missing in con.execute(
            f"SELECT sid, gpu, sum(greatest(0, round_even((t1 - t0) / i, 0) + 1 - n)) + "
            f"sum(CASE WHEN d > {groups.GAP_INTERVALS} * i "
            f"THEN round_even(d / i, 0) - 1 ELSE 0 END) "
            f"FROM {kind}_chain JOIN {kind}_iv USING (sid) GROUP BY ALL"
        ).fetchall()
    }


def _scope_sql(source: str, keys: str) -> tuple[str, str]:
    bits = ", ".join(f"sum(t_{name})" for _, name in CLOCK_EVENT_REASONS)
    main = (
        f"SELECT {keys}, sum(n), min(t0), max(t1), sum(util_sum) / nullif(sum(util_n), 0), "
        f"max(util_max), max(mem_max), max(temp_max), sum(p_sum) / nullif(sum(p_n), 0), "
        f"max(p_max), sum(lost_n), sum(sm_sum) / nullif(sum(sm_n), 0), "
        f"sum(tensor_sum) / nullif(sum(tensor_n), 0), sum(stalled_n), "
        f"list(DISTINCT gpu ORDER BY gpu), sum(busy_n), sum(throttled_n), sum(idle_n), "
        f"sum(temp_sum) / nullif(sum(temp_n), 0), {bits} "
        f"FROM {source} GROUP BY ALL"
    )
    hist = (
        f"SELECT {keys}, k, sum(v) FROM (SELECT {keys}, unnest(map_keys(bins)) AS k, "
        f"unnest(map_values(bins)) AS v FROM {source}) GROUP BY ALL"
    )
    return main, hist


@dataclass
class ScopeStats:
    """Aggregates of one scope (a GPU in a session, or an allocation), from DuckDB."""

    values: tuple[Any, ...]
    bins: dict[int, int] = field(default_factory=dict)
    spacings: Counter[float] = field(default_factory=Counter)
    missing: int = 0
    energy: float | None = None

    @property
    def samples(self) -> int:
        return int(self.values[0])

    @property
    def first(self) -> float:
        return float(self.values[1])

    @property
    def last(self) -> float:
        return float(self.values[2])

    @property
    def gpus(self) -> list[int]:
        return list(self.values[13])

    @property
    def busy(self) -> int:
        return int(self.values[14] or 0)

    @property
    def throttled(self) -> int:
        return int(self.values[15] or 0)

    def add_energy(self, joules: float | None) -> None:
        if joules is not None:
            self.energy = (self.energy or 0.0) + joules

    def to_dict(self, interval: float | None) -> dict[str, Any]:
        n, first, last, util_mean, util_max, mem, temp, power_mean = self.values[:8]
        power_peak, lost, sm, tensor, stalled = self.values[8:13]
        interval = interval or _interval_from(self.spacings)
        throttle = self.values[18:]
        temp_mean = self.values[17]
        throttled = self.throttled
        idle = self.values[16]  # NULL where no row has a utilization (a MIG-mode GPU)
        energy = self.energy
        return {
            "samples": int(n),
            "missing": self.missing,
            "lost_samples": int(lost or 0),
            "duration_s": _round(last - first + (interval or 0.0)),
            "util_mean_pct": _round(util_mean),
            "util_p95_pct": _percentile(self.bins, 95),
            "util_max_pct": util_max,
            "memory_peak_mib": mem,
            "temperature_max_c": temp,
            "temperature_mean_c": _round(temp_mean),
            "energy_j": _round(energy),
            "energy_kwh": _round(None if energy is None else energy / JOULES_PER_KWH, 6),
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
            "idle_s": _round(idle * interval) if interval and idle is not None else None,
        }


def scope_stats(con: Any, source: str, keys: str) -> dict[tuple[Any, ...], ScopeStats]:
    """Per-key aggregates of ``source`` (bucket groups of GPU rows), keyed by ``keys``."""
    nkeys = len(keys.split(","))
    main, hist = _scope_sql(source, keys)
    out: dict[tuple[Any, ...], ScopeStats] = {}
    for row in con.execute(main).fetchall():
        out[tuple(row[:nkeys])] = ScopeStats(tuple(row[nkeys:]))
    for row in con.execute(hist).fetchall():
        out[tuple(row[:nkeys])].bins[row[nkeys]] = int(row[nkeys + 1])
    return out


@dataclass
class _FileEnds:
    """A GPU's (or the host's) first and last row in one file, and its energy there."""

    first: tuple[float, float | None]
    last: tuple[float, float | None]
    #: The arguments of :func:`groups.file_energy` but the interval.
    energy: tuple[float | None, float | None, int, float | None, int, float | None, float | None]


#: Per (file, GPU): first and last row with power, and the energy inputs of the whole file.
_FILE_ENDS_SQL = """
SELECT fid, gpu, min(t0), arg_min_null(p_first, t0), max(t1), arg_max_null(p_last, t1),
       arg_min(e_first, t0), arg_max(e_last, t1), sum(e_n), sum(p_sum), sum(p_n)
FROM {source} GROUP BY fid, gpu
"""


def _file_ends(con: Any, source: str) -> dict[int, dict[int, _FileEnds]]:
    out: dict[int, dict[int, _FileEnds]] = {}
    for fid, gpu, t0, p0, t1, p1, e0, e1, e_n, p_sum, p_n in con.execute(
        _FILE_ENDS_SQL.format(source=source)
    ).fetchall():
        out.setdefault(fid, {})[gpu] = _FileEnds(
            (t0, p0), (t1, p1), (e0, e1, int(e_n or 0), p_sum, int(p_n or 0), p0, p1)
        )
    return out


def _session_energy(
    sessions: list[list[_FileSpan]],
    ends: dict[int, dict[int, _FileEnds]],
    intervals: dict[int, float | None],
) -> tuple[dict[tuple[int, int], float | None], dict[tuple[int, int], float]]:
    """Energy per (session, GPU) and the join energy at each (file, GPU)'s first row.

    Within a file the counter's rise (or power integrated, :func:`groups.file_energy`); across
    a file boundary of one session, where the counter restarts, power integrated over the one
    interval between the files (trapezoid), only across a gap within the continuation gap.
    """
    energy: dict[tuple[int, int], float | None] = {}
    joins: dict[tuple[int, int], float] = {}

    def add(key: tuple[int, int], joules: float | None) -> None:
        if joules is not None:
            energy[key] = (energy.get(key) or 0.0) + joules
        else:
            energy.setdefault(key, None)

    for sid, files in enumerate(sessions, 1):
        interval = intervals.get(sid) or 1.0
        seen: dict[int, tuple[float, float | None]] = {}
        for span in files:
            for gpu, fe in sorted(ends.get(span.fid, {}).items()):
                add((sid, gpu), groups.file_energy(*fe.energy, interval=interval))
                prev = seen.get(gpu)
                if prev is not None and fe.first[0] >= prev[0]:
                    dt = fe.first[0] - prev[0]
                    # The join of gputel.energy's rule 4, as the recorder counts it.
                    joined = trapezoid(prev[1], fe.first[1], dt) if dt <= span.max_gap else None
                    if joined is not None:
                        joins[(span.fid, gpu)] = joined
                        add((sid, gpu), joined)
                if prev is None or fe.last[0] >= prev[0]:
                    seen[gpu] = fe.last
    return energy, joins


def _host_sessions(con: Any) -> list[tuple[str, dict[str, Any], float, float]]:
    """Per host-file session: (node, host_stats, first, last)."""
    sessions = assign_sessions(con, "host_b", "host_b_files", "host")
    if not sessions:
        return []
    spacings = _session_chain(con, "host_b", "host")
    intervals = {
        sid: _interval_from(spacings.get((sid, 0), Counter()))
        for sid in range(1, len(sessions) + 1)
    }
    missing = _session_missing(con, "host", intervals)
    ends = _file_ends(con, "host_b")
    stats: dict[int, tuple[Any, ...]] = {
        sid: rest
        for sid, *rest in con.execute(
            "SELECT sid, sum(n), min(t0), max(t1), sum(cpu_sum) / nullif(sum(cpu_n), 0) "
            "FROM host_b JOIN host_sessions USING (fid) GROUP BY sid"
        ).fetchall()
    }
    out = []
    for sid, files in enumerate(sessions, 1):
        if sid not in stats:
            continue
        n, first, last, cpu = stats[sid]
        interval = intervals[sid]
        energy: float | None = None
        for span in files:
            for fe in ends.get(span.fid, {}).values():
                joules = groups.file_energy(*fe.energy, interval=interval or 1.0)
                if joules is not None:
                    energy = (energy or 0.0) + joules
        host_dict = {
            "samples": int(n),
            "missing": missing.get((sid, 0), 0),
            "cpu_util_mean_pct": _round(cpu),
            "rapl_energy_j": _round(energy),
            "interval_s": interval,
        }
        out.append((files[0].node, host_dict, first, last))
    return out


#: One row per (allocation id, row bucket): the tagged groups, a tag such as ``a;b`` counted
#: for each id, with the row just before each group in its file (an ASOF match on the groups:
#: the group of the same file and GPU that ended last before this one began).
_ALLOC_SQL = """
CREATE OR REPLACE TEMP TABLE au AS
SELECT * FROM (
  SELECT x.*, p.t1 AS prev_t1, p.e_last AS prev_e, p.p_last AS prev_p, k.t0 AS bucket_t0,
         unnest(string_split(x.alloc, ';')) AS alloc_id
  FROM (SELECT * FROM g WHERE alloc <> '') x
  JOIN gpu_b k USING (fid, gpu, b)
  ASOF LEFT JOIN g p ON x.fid = p.fid AND x.gpu = p.gpu AND x.t0 > p.t1
) WHERE alloc_id <> '' {only}
"""

#: The groups of each (allocation, node, GPU) merged per bucket, in time order.
_ALLOC_CHAIN_SQL = """
SELECT au.alloc_id, f.node, au.gpu, au.fid, min(au.t0) AS t0, max(au.t1) AS t1, sum(au.n),
       list_sort(flatten(list(au.head)))[1:2], any_value(coalesce(v.i, 1.0)),
       arg_min(au.e_first, au.t0), arg_max(au.e_last, au.t1), sum(au.e_n),
       arg_min_null(au.p_first, au.t0), arg_max_null(au.p_last, au.t1), sum(au.p_sum),
       sum(au.p_n), sum(au.idle_n), min(au.idle_t0), max(au.idle_t1), min(au.work_t0),
       max(au.work_t1), arg_min_null(au.prev_t1, au.t0), arg_min_null(au.prev_e, au.t0),
       arg_min_null(au.prev_p, au.t0), any_value(m.max_gap), min(au.bucket_t0)
FROM au JOIN g_files f USING (fid) JOIN gpu_sessions m USING (fid) LEFT JOIN gpu_iv v USING (sid)
GROUP BY au.alloc_id, f.node, au.gpu, au.fid, au.b
ORDER BY au.alloc_id, f.node, au.gpu, t0, au.fid
"""


def _alloc_groups(con: Any) -> Iterator[tuple[str, str, int, list[groups.AllocGroup]]]:
    """(allocation, node, GPU, its groups in time order), streamed."""
    cur = con.execute(_ALLOC_CHAIN_SQL)
    key: tuple[str, str, int] | None = None
    seq: list[groups.AllocGroup] = []
    while batch := cur.fetchmany(50_000):
        for alloc_id, node, gpu, fid, *rest in batch:
            if key != (alloc_id, node, gpu):
                if key is not None:
                    yield (*key, seq)
                key, seq = (alloc_id, node, gpu), []
            t0, t1, n, head, interval = rest[:5]
            seq.append(
                groups.AllocGroup(
                    fid,
                    t0,
                    t1,
                    int(n),
                    tuple(head),
                    interval,
                    rest[5],
                    rest[6],
                    int(rest[7] or 0),
                    rest[8],
                    rest[9],
                    rest[10],
                    int(rest[11] or 0),
                    int(rest[12] or 0),
                    rest[13],
                    rest[14],
                    rest[15],
                    rest[16],
                    groups.Before(rest[17], rest[18], rest[19], rest[20], rest[21]),
                )
            )
    if key is not None:
        yield (*key, seq)


def _alloc_energy(
    seq: list[groups.AllocGroup], joins: dict[tuple[int, int], float], gpu: int
) -> float | None:
    """Each tagged row carries the energy of the interval that ends at it (the module's energy
    rule): within a group the counter's rise, into a group the rise from the row before it in
    its file, or at a file's first row the join from the session's previous file."""
    total: float | None = None
    for grp in seq:
        parts = [
            groups.file_energy(
                grp.e_first,
                grp.e_last,
                grp.e_n,
                grp.p_sum,
                grp.p_n,
                grp.p_first,
                grp.p_last,
                grp.interval,
            )
        ]
        before = grp.before
        starts_bucket = grp.t0 <= before.bucket_t0
        if before.t1 is None and starts_bucket:
            parts.append(joins.get((grp.fid, gpu)))
        elif before.t1 is not None and (
            starts_bucket or not is_gap(grp.t0 - before.t1, grp.interval)
        ):
            if grp.e_first is not None and before.energy is not None:
                parts.append(max(0.0, grp.e_first - before.energy))
            elif grp.t0 - before.t1 <= before.max_gap:
                parts.append(trapezoid(before.power, grp.p_first, grp.t0 - before.t1))
        elif grp.p_first is not None:
            # The row before lies inside another group of this bucket: its counter value is
            # not kept, so the interval is the first row's power over one interval.
            parts.append(grp.p_first * grp.interval)
        for joules in parts:
            if joules is not None:
                total = (total or 0.0) + joules
    return total


def _alloc_spacings(seq: list[groups.AllocGroup]) -> Counter[float]:
    out: Counter[float] = Counter()
    prev: groups.AllocGroup | None = None
    for grp in seq:
        if len(grp.head) == 2 and grp.head[1] > grp.head[0]:
            out[round(grp.head[1] - grp.head[0], 3)] += 1
        if prev is not None and grp.t0 > prev.t1:
            out[round(grp.t0 - prev.t1, 3)] += 1
        prev = grp
    return out


def _alloc_missing(seq: list[groups.AllocGroup], interval: float | None) -> int:
    if not interval:
        return 0
    missing = 0
    prev: groups.AllocGroup | None = None
    for grp in seq:
        missing += max(0, round((grp.t1 - grp.t0) / interval) + 1 - grp.n)
        if prev is not None and is_gap(grp.t0 - prev.t1, interval):
            missing += round((grp.t0 - prev.t1) / interval) - 1
        prev = grp
    return missing


def _load_all(
    con: Any, fs: duck.FileSet, flt: ReportFilter, width: float, idle_util: float
) -> None:
    duck.load(
        con,
        fs,
        "gpu",
        flt,
        table="g",
        wrap=lambda inner: groups.gpu_groups_sql(inner, width, idle_util),
    )
    host_flt = flt if flt.allocation is None else ReportFilter(since=1, until=0)
    duck.load(
        con,
        fs,
        "host",
        host_flt,
        table="host_b",
        wrap=lambda inner: groups.host_groups_sql(inner, width),
    )
    duck.load(con, fs, "events", flt)


def build_report(
    paths: list[Path] | tuple[Path, ...],
    flt: ReportFilter | None = None,
    idle_util: float = 5.0,
    idle_minutes: float = 30.0,
    con: Any = None,
    found: duck.FileSet | None = None,
) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints); ``found``: the files of
    ``paths`` when the caller has found them already."""
    from gputel.analysis import fleet

    flt = flt or ReportFilter()
    con = con or duck.connect()
    idle_limit = float(idle_minutes) * 60
    fs = found if found is not None else duck.find_files(list(paths))
    _load_all(con, fs, flt, groups.bucket_width(idle_limit), idle_util)
    con.execute(
        "CREATE OR REPLACE TEMP TABLE gpu_b AS SELECT fid, gpu, b, sum(n) AS n, min(t0) AS t0, "
        "max(t1) AS t1, list_sort(flatten(list(head)))[1:2] AS head FROM g GROUP BY fid, gpu, b"
    )
    gpu_sessions = assign_sessions(con, "gpu_b", "g_files", "gpu")
    chain_spacings = _session_chain(con, "gpu_b", "gpu")
    session_spacing: dict[int, Counter[float]] = {}
    for (sid, _gpu), counts in chain_spacings.items():
        session_spacing.setdefault(sid, Counter()).update(counts)
    intervals = {sid: _interval_from(c) for sid, c in session_spacing.items()}
    missing = _session_missing(con, "gpu", intervals)
    ends = _file_ends(con, "g")
    energy, joins = _session_energy(gpu_sessions, ends, intervals)

    per_gpu = scope_stats(
        con, "(SELECT m.sid, g.* FROM g JOIN gpu_sessions m USING (fid))", "sid, gpu"
    )
    for key, st in per_gpu.items():
        st.spacings = chain_spacings.get(key, Counter())
        st.missing = missing.get(key, 0)
        st.energy = energy.get(key)
    identity = {
        (sid, gpu): (uuid or "", name or "")
        for sid, gpu, uuid, name in con.execute(
            "SELECT m.sid, g.gpu, arg_min(g.uuid, g.t0), arg_min(g.name, g.t0) "
            "FROM g JOIN gpu_sessions m USING (fid) GROUP BY ALL"
        ).fetchall()
    }
    nodes_of = {sid: files[0].node for sid, files in enumerate(gpu_sessions, 1)}
    heads = {
        sid: (head_first, own_first)
        for sid, head_first, own_first in con.execute(
            "SELECT m.sid, min(g.head_t0), min(g.own_t0) FROM g JOIN gpu_sessions m USING (fid) "
            "GROUP BY m.sid"
        ).fetchall()
    }

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

    only = "" if flt.allocation is None else f"AND alloc_id = {duck.quote(flt.allocation)}"
    con.execute(_ALLOC_SQL.format(only=only))
    per_alloc = scope_stats(con, "au", "alloc_id")
    per_alloc_gpu = scope_stats(
        con, "(SELECT au.*, f.node FROM au JOIN g_files f USING (fid))", "alloc_id, node, gpu"
    )
    alloc_nodes: dict[str, list[str]] = {}
    idle = fleet.IdleAllocations(idle_limit)
    # The chain comes ordered by allocation: one allocation's sequences in memory at a time.
    for alloc_id, items in itertools.groupby(_alloc_groups(con), key=lambda x: x[0]):
        st = per_alloc[(alloc_id,)]
        seqs = []
        for _, node, gpu, seq in items:
            if not alloc_nodes.get(alloc_id) or alloc_nodes[alloc_id][-1] != node:
                alloc_nodes.setdefault(alloc_id, []).append(node)
            spacings = _alloc_spacings(seq)
            joules = _alloc_energy(seq, joins, gpu)
            st.spacings.update(spacings)
            st.add_energy(joules)
            one = per_alloc_gpu[(alloc_id, node, gpu)]
            one.spacings.update(spacings)
            one.add_energy(joules)
            one.missing = _alloc_missing(seq, _interval_from(one.spacings))
            idle.add(node, alloc_id, gpu, seq)
            seqs.append(seq)
        st.missing = sum(_alloc_missing(seq, _interval_from(st.spacings)) for seq in seqs)
    gpus_of: dict[str, list[dict[str, Any]]] = {}
    for (alloc_id, node, gpu), one in sorted(per_alloc_gpu.items()):
        d = one.to_dict(_interval_from(per_alloc[(alloc_id,)].spacings))
        gpus_of.setdefault(alloc_id, []).append({"node": node, "gpu": gpu, **d})
    alloc_list = []
    for (alloc_id,), st in sorted(per_alloc.items()):
        d = st.to_dict(_interval_from(st.spacings))
        alloc_list.append(
            {
                "id": alloc_id,
                **d,
                "gpus": st.gpus,
                "start": _iso(st.first),
                "end": _iso(st.last),
                "nodes": alloc_nodes.get(alloc_id, []),
                "events": events.for_allocation(alloc_id),
                "per_gpu": gpus_of.get(alloc_id, []),
            }
        )
    report: dict[str, Any] = {"sessions": out_sessions, "allocations": alloc_list}
    totals = [
        fleet.GpuTotals(
            node=nodes_of[sid],
            gpu=gpu,
            model=identity.get((sid, gpu), ("", ""))[1],
            interval=intervals.get(sid) or 1.0,
            samples=st.samples,
            busy=st.busy,
            throttled=st.throttled,
            energy=st.energy,
        )
        for (sid, gpu), st in sorted(per_gpu.items())
    ]
    report.update(fleet.fleet_summary(events, totals, idle.result()))
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
