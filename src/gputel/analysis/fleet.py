"""The fleet view of a report: per node and GPU model totals, events, idle allocated GPUs.

Fleet operators ask one question above all: which GPUs were allocated and did nothing. An
allocation is *idle* on a GPU when the GPU stayed under ``idle_util`` % utilization, without a
break and without a gap in the recording, for more than ``idle_minutes`` while the allocation
was open on it. Works on the tables :mod:`gputel.analysis.report` builds (``r``, ``a``, ``sess``,
``events``).
"""

from __future__ import annotations

from typing import Any

from gputel.schema import THROTTLE_MASK

JOULES_PER_KWH = 3.6e6


class EventCounts:
    """GPU events (``events.csv``) counted by event and Xid, for sessions and allocations."""

    def __init__(self, con: Any) -> None:
        self._rows: list[tuple[str, float, str, str, str]] = con.execute(
            "SELECT node, ts, event, coalesce(xid, ''), coalesce(allocations, '') FROM events"
        ).fetchall()

    @staticmethod
    def _count(rows: list[tuple[str, float, str, str, str]]) -> list[dict[str, Any]]:
        counts: dict[tuple[str, str], int] = {}
        for _, _, event, xid, _ in rows:
            counts[(event, xid)] = counts.get((event, xid), 0) + 1
        return [{"event": e, "xid": x or None, "count": n} for (e, x), n in sorted(counts.items())]

    def between(self, node: str, first: float, last: float) -> list[dict[str, Any]]:
        return self._count([r for r in self._rows if r[0] == node and first <= r[1] <= last])

    def for_allocation(self, alloc_id: str) -> list[dict[str, Any]]:
        return self._count([r for r in self._rows if alloc_id in r[4].split(";")])


_TOTALS = """
SELECT {key}, count(DISTINCT (s.node, r.gpu)) AS gpus,
       round(sum(s.interval) / 3600, 3) AS gpu_hours_recorded,
       round(coalesce(sum(s.interval) FILTER (WHERE r.util >= {idle_util}), 0) / 3600, 3)
         AS gpu_hours_busy,
       round(sum(r.delta) / {kwh}, 6) AS energy_kwh,
       round(coalesce(sum(s.interval) FILTER (WHERE r.reasons & {mask} <> 0), 0), 3)
         AS throttled_s
FROM rv r JOIN sess s USING (sid) JOIN ident i USING (sid, gpu) GROUP BY ALL ORDER BY ALL
"""

_IDLE = """
WITH x AS (
  SELECT a.node, a.alloc_id, a.gpu, a.ts, s.interval, coalesce(a.util < {idle_util}, false) AS idle,
         CASE WHEN NOT coalesce(a.util < {idle_util}, false) OR a.alloc_spacing IS NULL
                   OR a.alloc_spacing > 1.5 * s.interval THEN 1 ELSE 0 END AS brk
  FROM a JOIN sess s USING (sid, node)
), y AS (
  SELECT *, sum(brk) OVER (PARTITION BY node, alloc_id, gpu ORDER BY ts
                           ROWS UNBOUNDED PRECEDING) AS stretch
  FROM x
), z AS (
  SELECT node, alloc_id, gpu, max(ts) - min(ts) + max(interval) AS idle_s
  FROM y WHERE idle GROUP BY node, alloc_id, gpu, stretch
), w AS (
  SELECT node, alloc_id, gpu, max(idle_s) AS longest,
         sum(idle_s) FILTER (WHERE idle_s > {limit}) AS total
  FROM z GROUP BY ALL HAVING max(idle_s) > {limit}
)
SELECT node, alloc_id, list(gpu ORDER BY gpu), max(longest), sum(total)
FROM w GROUP BY ALL ORDER BY sum(total) DESC, max(longest) DESC, node, alloc_id
"""


def fleet_summary(con: Any, idle_util: float, idle_minutes: float) -> dict[str, Any]:
    """``nodes``, ``models`` and ``idle_allocations`` of the report."""
    fmt = {"idle_util": float(idle_util), "kwh": JOULES_PER_KWH, "mask": THROTTLE_MASK}
    event_counts = dict(con.execute("SELECT node, count(*) FROM events GROUP BY node").fetchall())
    idle = [
        {
            "node": node,
            "allocation": alloc_id,
            "gpus": list(gpus),
            "idle_minutes": round(longest / 60, 1),
            "idle_gpu_hours": round(total / 3600, 3),
        }
        for node, alloc_id, gpus, longest, total in con.execute(
            _IDLE.format(idle_util=float(idle_util), limit=float(idle_minutes) * 60)
        ).fetchall()
    ]
    idle_per_node: dict[str, int] = {}
    for item in idle:
        idle_per_node[item["node"]] = idle_per_node.get(item["node"], 0) + 1
    nodes = []
    for node, gpus, recorded, busy, kwh, throttled in con.execute(
        _TOTALS.format(key="s.node", **fmt)
    ).fetchall():
        nodes.append(
            {
                "node": node,
                "gpus": gpus,
                "gpu_hours_recorded": recorded,
                "gpu_hours_busy": busy,
                "energy_kwh": kwh,
                "throttled_s": throttled,
                "events": event_counts.get(node, 0),
                "idle_allocations": idle_per_node.get(node, 0),
            }
        )
    models = [
        {
            "model": model or "",
            "gpus": gpus,
            "gpu_hours_recorded": recorded,
            "gpu_hours_busy": busy,
            "energy_kwh": kwh,
            "throttled_s": throttled,
        }
        for model, gpus, recorded, busy, kwh, throttled in con.execute(
            _TOTALS.format(key="coalesce(i.name, '')", **fmt)
        ).fetchall()
    ]
    return {"nodes": nodes, "models": models, "idle_allocations": idle}
