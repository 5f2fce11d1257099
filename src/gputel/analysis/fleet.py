"""The fleet view of a report: per node and GPU model totals, events, idle allocated GPUs.

Fleet operators ask one question above all: which GPUs were allocated and did nothing. An
allocation is *idle* on a GPU when the GPU stayed under ``idle_util`` % utilization, without a
break and without a gap in the recording, for more than ``idle_minutes`` while the allocation
was open on it. The stretches are followed over the allocation's bucket groups
(:mod:`gputel.analysis.groups`), never over single rows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gputel.analysis.groups import JOULES_PER_KWH, AllocGroup, is_gap


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

    def per_node(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node, *_ in self._rows:
            out[node] = out.get(node, 0) + 1
        return out


@dataclass(frozen=True)
class GpuTotals:
    """One GPU in one session: what the node and model totals add up."""

    node: str
    gpu: int
    model: str
    interval: float
    samples: int
    busy: int
    throttled: int
    energy: float | None


class IdleAllocations:
    """Idle stretches of allocated GPUs, fed one (node, allocation, GPU) sequence at a time.

    A stretch is a run of rows under the idle threshold with no spacing over 1.5 intervals; its
    length is last − first + one interval. Inside a group that is partly busy only its leading
    and trailing idle rows can join a stretch (anything between is shorter than a bucket, and a
    bucket is never longer than the threshold); a group with a gap inside ends the stretch.
    """

    def __init__(self, limit_s: float) -> None:
        self.limit = limit_s
        self._found: dict[tuple[str, str], list[tuple[int, float, float]]] = {}

    def add(self, node: str, alloc_id: str, gpu: int, seq: list[AllocGroup]) -> None:
        longest = 0.0
        total = 0.0
        start: float | None = None
        end = 0.0
        interval = 1.0
        prev: AllocGroup | None = None

        def close() -> None:
            nonlocal start, longest, total
            if start is not None:
                length = end - start + interval
                longest = max(longest, length)
                if length > self.limit:
                    total += length
            start = None

        for grp in seq:
            adjacent = prev is not None and not is_gap(grp.t0 - prev.t1, grp.interval)
            prev = grp
            if not adjacent:
                close()
            interval = grp.interval
            if grp.idle_n == 0 or grp.idle_t0 is None or grp.idle_t1 is None:
                close()
                continue
            if not grp.gapless(grp.interval):
                close()
                continue
            if grp.idle_n >= grp.n:
                if start is None:
                    start = grp.t0
                end = grp.t1
                continue
            if grp.idle_t0 == grp.t0 and grp.work_t0 is not None:
                if start is None:
                    start = grp.t0
                end = grp.work_t0 - grp.interval
            close()
            if grp.idle_t1 == grp.t1 and grp.work_t1 is not None:
                start, end = grp.work_t1 + grp.interval, grp.t1
        close()
        if longest > self.limit:
            self._found.setdefault((node, alloc_id), []).append((gpu, longest, total))

    def result(self) -> list[dict[str, Any]]:
        """Idle allocations, worst first: most idle GPU-time, then the longest stretch."""
        rows = []
        for (node, alloc_id), per_gpu in self._found.items():
            longest = max(x[1] for x in per_gpu)
            total = sum(x[2] for x in per_gpu)
            rows.append((node, alloc_id, sorted(x[0] for x in per_gpu), longest, total))
        rows.sort(key=lambda r: (-r[4], -r[3], r[0], r[1]))
        return [
            {
                "node": node,
                "allocation": alloc_id,
                "gpus": gpus,
                "idle_minutes": round(longest / 60, 1),
                "idle_gpu_hours": round(total / 3600, 3),
            }
            for node, alloc_id, gpus, longest, total in rows
        ]


def _totals(rows: Iterable[GpuTotals]) -> dict[str, Any]:
    rows = list(rows)
    joules = [r.energy for r in rows if r.energy is not None]
    return {
        "gpus": len({(r.node, r.gpu) for r in rows}),
        "gpu_hours_recorded": round(sum(r.samples * r.interval for r in rows) / 3600, 3),
        "gpu_hours_busy": round(sum(r.busy * r.interval for r in rows) / 3600, 3),
        "energy_kwh": round(sum(joules) / JOULES_PER_KWH, 6) if joules else None,
        "throttled_s": round(sum(r.throttled * r.interval for r in rows), 3),
    }


def fleet_summary(
    events: EventCounts, gpus: list[GpuTotals], idle: list[dict[str, Any]]
) -> dict[str, Any]:
    """``nodes``, ``models`` and ``idle_allocations`` of the report."""
    event_counts = events.per_node()
    idle_per_node: dict[str, int] = {}
    for item in idle:
        idle_per_node[item["node"]] = idle_per_node.get(item["node"], 0) + 1
    by_node: dict[str, list[GpuTotals]] = {}
    by_model: dict[str, list[GpuTotals]] = {}
    for g in gpus:
        by_node.setdefault(g.node, []).append(g)
        by_model.setdefault(g.model, []).append(g)
    nodes = [
        {
            "node": node,
            **_totals(rows),
            "events": event_counts.get(node, 0),
            "idle_allocations": idle_per_node.get(node, 0),
        }
        for node, rows in sorted(by_node.items())
    ]
    models = [{"model": model, **_totals(rows)} for model, rows in sorted(by_model.items())]
    return {"nodes": nodes, "models": models, "idle_allocations": idle}
