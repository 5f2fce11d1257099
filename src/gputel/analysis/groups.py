"""The one pass over the rows: per-minute groups that every report figure is summed from.

Reading a week of one node is half a gigabyte of CSV; ordering its rows (per-row windows for
gaps, energy and idle stretches) costs more than parsing them. So the CSV is read once into a
streaming aggregate: one row per file, GPU, allocation tag and time bucket (a minute, or less when
the idle threshold is shorter), with sums, extremes, the first and last values in time and the
two earliest timestamps. Everything that needs order (spacings, gaps, energy chains, idle
stretches) is then worked out over these groups, about sixty times fewer than the rows.

What that costs in exactness, and why it does not matter to a tick grid:

* the recording interval is the most common spacing among each group's first spacing and the
  spacings between consecutive groups of a GPU (rather than among all spacings);
* the ticks missing inside a group are those its interval grid expects between its first and
  last row that have no row (on a drift-free recording, the same number);
* an idle stretch is followed from group to group; a group with missing ticks inside ends the
  stretch at its edge (the gap's exact place inside that minute is not kept);
* the row before an allocation's group is the last row of the group of its file and GPU that
  ended last before it began; where that row lies inside another group of the same bucket (a
  tag that comes and goes within one bucket) or beyond a gap inside the bucket, the interval
  ending at the group's first row is that row's power times the interval.
"""

from __future__ import annotations

from dataclasses import dataclass

from gputel.schema import CLOCK_EVENT_REASONS, THROTTLE_MASK

#: Two rows further apart than this many intervals have ticks missing between them: one interval
#: is the recorder's pace, the half more its jitter (report, fleet and replay count gaps by it).
GAP_INTERVALS = 1.5


def is_gap(spacing: float, interval: float) -> bool:
    """Whether rows ``spacing`` seconds apart, at ``interval``, have a tick missing between."""
    return spacing > GAP_INTERVALS * interval


JOULES_PER_KWH = 3.6e6
#: Width of a time bucket in seconds, and the shortest allowed (a finer idle threshold).
BUCKET_S = 60.0
MIN_BUCKET_S = 1.0
#: GPU utilization at or above which a GPU is busy while its SM activity under
#: ``STALLED_SM_PCT`` means it waits (memory, I/O, host): "busy but stalled" seconds.
STALLED_UTIL_PCT = 50.0
STALLED_SM_PCT = 20.0


def bucket_width(idle_limit_s: float) -> float:
    """A bucket never longer than the idle threshold: a stretch shorter than one bucket can hide
    inside a group, and only stretches longer than the threshold are listed."""
    return max(MIN_BUCKET_S, min(BUCKET_S, idle_limit_s))


def _bin(util: str) -> str:
    return f"least(1000, greatest(0, round_even({util} * 10, 0)))::INTEGER"


def gpu_groups_sql(inner: str, width: float, idle_util: float) -> str:
    """The grouping SELECT over ``inner`` (the typed GPU rows of :func:`duck.load`)."""
    bits = ", ".join(
        f"sum((reasons >> {bit.bit_length() - 1}) & 1) AS t_{name}"
        for bit, name in CLOCK_EVENT_REASONS
    )
    idle = f"util < {float(idle_util)!r}"
    return f"""
SELECT fid, gpu, coalesce(alloc, '') AS alloc, floor(ts / {float(width)!r})::BIGINT AS b,
       count(*) AS n, min(ts) AS t0, max(ts) AS t1, min(ts, 2) AS head,
       sum(util) AS util_sum, count(util) AS util_n, max(util) AS util_max,
       max(mem) AS mem_max, max(temp) AS temp_max, sum(temp) AS temp_sum, count(temp) AS temp_n,
       sum(power) AS p_sum, count(power) AS p_n, max(power) AS p_max,
       arg_min_null(power, ts) AS p_first, arg_max_null(power, ts) AS p_last,
       arg_min(energy, ts) AS e_first, arg_max(energy, ts) AS e_last, count(energy) AS e_n,
       sum(lost::INTEGER) AS lost_n, sum(sm) AS sm_sum, count(sm) AS sm_n,
       sum(tensor) AS tensor_sum, count(tensor) AS tensor_n,
       sum((util >= {STALLED_UTIL_PCT} AND sm < {STALLED_SM_PCT})::INTEGER) AS stalled_n,
       sum(((reasons & {THROTTLE_MASK}) <> 0)::INTEGER) AS throttled_n, {bits},
       sum(({idle})::INTEGER) AS idle_n, sum((NOT ({idle}))::INTEGER) AS busy_n,
       min(CASE WHEN {idle} THEN ts END) AS idle_t0, max(CASE WHEN {idle} THEN ts END) AS idle_t1,
       min(CASE WHEN {idle} THEN NULL ELSE ts END) AS work_t0,
       max(CASE WHEN {idle} THEN NULL ELSE ts END) AS work_t1,
       histogram({_bin("util")}) AS bins,
       arg_min(uuid, ts) AS uuid, arg_min(name, ts) AS name,
       min(CASE WHEN head THEN ts END) AS head_t0,
       min(CASE WHEN head THEN NULL ELSE ts END) AS own_t0
FROM (
  SELECT fid, gpu, ts, utilization_gpu_pct AS util, memory_used_mib AS mem,
         temperature_c AS temp, power_w AS power, energy_j AS energy,
         clock_event_reasons AS reasons, lost = '1' AS lost, allocations AS alloc,
         sm_active_pct AS sm, tensor_active_pct AS tensor, uuid, name,
         coalesce(pretrigger = '1', false) AS head
  FROM ({inner})
)
GROUP BY ALL
"""


def host_groups_sql(inner: str, width: float) -> str:
    """The grouping SELECT over the typed host rows (one pseudo-GPU 0 per file)."""
    return f"""
SELECT fid, 0 AS gpu, floor(ts / {float(width)!r})::BIGINT AS b,
       count(*) AS n, min(ts) AS t0, max(ts) AS t1, min(ts, 2) AS head,
       sum(cpu_util_pct) AS cpu_sum, count(cpu_util_pct) AS cpu_n,
       sum(cpu_package_power_w) AS p_sum, count(cpu_package_power_w) AS p_n,
       arg_min_null(cpu_package_power_w, ts) AS p_first,
       arg_max_null(cpu_package_power_w, ts) AS p_last,
       arg_min(cpu_package_energy_j, ts) AS e_first, arg_max(cpu_package_energy_j, ts) AS e_last,
       count(cpu_package_energy_j) AS e_n
FROM ({inner})
GROUP BY ALL
"""


def file_energy(
    e_first: float | None,
    e_last: float | None,
    e_n: int,
    p_sum: float | None,
    p_n: int,
    p_first: float | None,
    p_last: float | None,
    interval: float,
) -> float | None:
    """Energy of one stretch of rows: the counter's rise where it has two values (it counts
    joules since its file began, so it never falls within a file), else power integrated over
    the intervals between its rows (trapezoid), else unknown."""
    if e_n >= 2 and e_first is not None and e_last is not None:
        return max(0.0, e_last - e_first)
    if p_n >= 2 and p_sum is not None:
        return interval * (p_sum - ((p_first or 0.0) + (p_last or 0.0)) / 2)
    return None


@dataclass(frozen=True)
class Before:
    """The row just before a group in its file (all None at a file's first row)."""

    t1: float | None
    energy: float | None
    power: float | None
    #: The session's continuation gap: power is integrated across no longer spacing.
    max_gap: float
    #: The first row of the group's file and GPU in the group's bucket.
    bucket_t0: float


@dataclass(frozen=True)
class AllocGroup:
    """One allocation's rows on one GPU within one bucket (tags such as ``a;b`` merged per id),
    in the order of its (node, allocation, GPU) sequence, with what the sequence needs."""

    fid: int
    t0: float
    t1: float
    n: int
    head: tuple[float, ...]
    #: The session's recording interval.
    interval: float
    e_first: float | None
    e_last: float | None
    e_n: int
    p_first: float | None
    p_last: float | None
    p_sum: float | None
    p_n: int
    idle_n: int
    idle_t0: float | None
    idle_t1: float | None
    work_t0: float | None
    work_t1: float | None
    before: Before

    def gapless(self, interval: float) -> bool:
        """Every tick of the interval grid between its first and last row has a row."""
        return round((self.t1 - self.t0) / interval) + 1 <= self.n
