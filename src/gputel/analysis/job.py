"""``gputel job``: what one allocation did, per GPU, from the recorded files.

The figures are the report's (:func:`report.build_report` with the allocation filter): one
energy rule, one definition of idle, throttled and "busy but stalled" time
(:mod:`gputel.analysis.groups`). This module adds what only one allocation needs: the summary row
the agent wrote when it ended (``allocations.csv``), the processes and users on its GPUs
(``processes-*.csv``), the GPU events during it (``events.csv``) and a verdict in words.

The result is plain data (:class:`Job`); figures from another source (a Slurm accounting
summary, for instance) are merged into it by name with :meth:`Job.merge`, never mixed into the
recorded ones.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import CsvReadError, ReportFilter, UnknownAllocation
from gputel.analysis.groups import STALLED_SM_PCT, STALLED_UTIL_PCT
from gputel.control.allocations import SUMMARY_FILE
from gputel.formats import iso_utc_ms, original_text, parse_iso_utc
from gputel.schema import CLOCK_EVENT_REASONS, THROTTLE_MASK

#: A GPU idle for at least this share of the job is named in the verdict.
IDLE_SHARE = 0.5
#: A throttle reason or stalled time over at least this share of the job is named.
THROTTLE_SHARE = 0.1
STALLED_SHARE = 0.25

#: The throttle reasons as people say them (the ``THROTTLE_MASK`` ones).
REASON_WORDS = {
    "sw_power_cap": "power cap",
    "hw_slowdown": "hardware slowdown",
    "sw_thermal_slowdown": "thermal limit",
    "hw_thermal_slowdown": "hardware thermal limit",
    "hw_power_brake_slowdown": "power brake",
}
THROTTLE_NAMES = frozenset(name for bit, name in CLOCK_EVENT_REASONS if bit & THROTTLE_MASK)
#: ``energy_source`` of a detected job that shared a GPU with another job.
SHARED = "none: a GPU was shared with another job"


@dataclass
class Job:
    """One allocation, as plain data (what ``gputel job --json`` prints)."""

    id: str
    start: str | None
    end: str | None
    duration_s: float | None
    nodes: list[str]
    gpus: list[int]
    energy_j: float | None
    #: Where ``energy_j`` comes from: ``allocations.csv`` (the agent's summary when the
    #: allocation ended) or ``recorded rows`` (the report's rule over the rows tagged with it).
    energy_source: str | None
    #: The report's figures over all the allocation's rows (util mean/p95, throttle_s, ...).
    recorded: dict[str, Any] | None
    #: The same figures per GPU (``node``, ``gpu``, ``name``, ``idle_s``, ``stalled_s``, ...).
    per_gpu: list[dict[str, Any]]
    #: The ``allocations.csv`` row(s) for this id, as written.
    summary: list[dict[str, str]]
    processes: list[dict[str, Any]]
    users: list[str]
    events: list[dict[str, Any]]
    verdict: list[str]
    #: Figures from other sources, by source name (``{"slurm": {...}}``); see :meth:`merge`.
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)

    def merge(self, source: str, figures: dict[str, Any]) -> None:
        """Add another source's figures for this job under its own name."""
        self.sources[source] = dict(figures)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ts(text: str) -> float | None:
    try:
        return parse_iso_utc(text.strip()).timestamp()
    except ValueError:
        return None


def summary_rows(paths: list[Path], alloc_id: str | None = None) -> list[dict[str, str]]:
    """``allocations.csv`` rows (for ``alloc_id``, or all), with the node from the directory."""
    return _summary_rows(duck.find_files(paths), alloc_id)


def _summary_rows(fs: duck.FileSet, alloc_id: str | None) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in fs.files["allocations"]:
        try:
            with duck.open_text(path) as fh:
                for row in csv.DictReader(fh):
                    if alloc_id is None or row.get("id") == alloc_id:
                        rows.append({k: v or "" for k, v in row.items() if k is not None})
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise CsvReadError(f"{path}: {exc}") from None
    return rows


def known_ids(fs: duck.FileSet) -> list[str]:
    """Every allocation id in the GPU rows and ``allocations.csv`` files of ``fs``."""
    con = duck.connect()
    duck.load(
        con,
        fs,
        "gpu",
        ReportFilter(),
        table="tags",
        wrap=lambda inner: f"SELECT DISTINCT allocations FROM ({inner}) WHERE allocations <> ''",
    )
    ids = {
        tag
        for (tags,) in con.execute("SELECT DISTINCT allocations FROM tags").fetchall()
        for tag in tags.split(";")
        if tag
    }
    ids.update(r["id"] for r in _summary_rows(fs, None) if r.get("id"))
    return sorted(ids)


#: ``2026-11-22T10:00:00.000Z``: the recorder's timestamps, which compare as text in time order.
_ISO_MS_LEN = 24


def _canonical(text: str) -> str | None:
    """The timestamp in the recorder's form (as written, or re-written), None if unreadable."""
    if len(text) == _ISO_MS_LEN and text.endswith("Z") and text[10] == "T":
        return text
    ts = _ts(text)
    return None if ts is None else iso_utc_ms(ts)


#: The ``processes-*.csv`` columns a user's process decides (``formats.safe_text`` on write).
_TEXT_CELLS = frozenset({"user", "command", "job"})


def _processes(
    fs: duck.FileSet, nodes: list[str], gpus: list[int], first: float, last: float
) -> list[dict[str, Any]]:
    """The processes seen on the job's GPUs between ``first`` and ``last``, one entry per
    (node, GPU, pid, command) with its user, job tag, peak memory and mean SM share.

    A week of a busy node is millions of rows: timestamps are compared as text (the recorder's
    form sorts in time order) and only the job's rows are looked at further.
    """
    lo, hi = iso_utc_ms(first), iso_utc_ms(last)
    seen: dict[tuple[str, int, str, str], dict[str, Any]] = {}
    wanted = {str(g) for g in gpus}
    for path in fs.files["processes"]:
        node = fs.nodes[path]
        if nodes and node not in nodes:
            continue
        try:
            with duck.open_text(path) as fh:
                reader = csv.reader(fh)
                header = next(reader, [])
                col = {name: i for i, name in enumerate(header)}
                if not {"timestamp", "gpu", "pid"} <= col.keys():
                    continue
                width = len(header)
                at, on = col["timestamp"], col["gpu"]
                for cells in reader:
                    if len(cells) != width:
                        raise CsvReadError(
                            f"{path}: line {reader.line_num} has {len(cells)} cells, "
                            f"expected {width}"
                        )
                    if cells[on] not in wanted:
                        continue
                    stamp = _canonical(cells[at])
                    if stamp is None:
                        raise CsvReadError(
                            f"{path}: line {reader.line_num}: bad timestamp {cells[at]!r}"
                        )
                    if not lo <= stamp <= hi:
                        continue
                    # Text cells back as the process gave them (the CSV cell rule's quote off).
                    row = {
                        k: original_text(v) if k in _TEXT_CELLS else v
                        for k, v in zip(header, cells, strict=True)
                    }
                    _add_process(seen, node, int(cells[on]), stamp, row)
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise CsvReadError(f"{path}: {exc}") from None
    out = []
    for entry in sorted(seen.values(), key=lambda e: (e["first"], e["gpu"], e["pid"])):
        total, n = entry.pop("_sm")
        entry["sm_util_mean_pct"] = round(total / n, 1) if n else None
        out.append(entry)
    return out


def _add_process(
    seen: dict[tuple[str, int, str, str], dict[str, Any]],
    node: str,
    gpu: int,
    stamp: str,
    row: dict[str, str],
) -> None:
    key = (node, gpu, row.get("pid") or "", row.get("command") or "")
    entry = seen.get(key)
    if entry is None:
        entry = seen[key] = {
            "node": node,
            "gpu": gpu,
            "pid": key[2],
            "user": row.get("user") or "",
            "command": key[3],
            "job": row.get("job") or "",
            "first": stamp,
            "last": stamp,
            "samples": 0,
            "memory_peak_mib": None,
            "_sm": [0.0, 0],
        }
    entry["first"] = min(entry["first"], stamp)
    entry["last"] = max(entry["last"], stamp)
    entry["samples"] += 1
    mem = _float(row.get("memory_used_mib"))
    if mem is not None:
        peak = entry["memory_peak_mib"]
        entry["memory_peak_mib"] = mem if peak is None else max(peak, mem)
    sm = _float(row.get("sm_util_pct"))
    if sm is not None:
        entry["_sm"][0] += sm
        entry["_sm"][1] += 1


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _events(
    con: Any, alloc_id: str, nodes: list[str], gpus: list[int], first: float, last: float
) -> list[dict[str, Any]]:
    """Events tagged with the allocation, or on its GPUs (and nodes) while it ran."""
    rows = con.execute(
        "SELECT node, ts, gpu, coalesce(uuid, ''), event, coalesce(xid, ''), "
        "coalesce(detail, ''), coalesce(allocations, '') FROM events ORDER BY ts, gpu"
    ).fetchall()
    out = []
    for node, ts, gpu, uuid, event, xid, detail, tags in rows:
        tagged = alloc_id in tags.split(";")
        during = first <= ts <= last and gpu in gpus and (not nodes or node in nodes)
        if tagged or during:
            out.append(
                {
                    "timestamp": iso_utc_ms(ts),
                    "node": node,
                    "gpu": gpu,
                    "uuid": uuid,
                    "event": event,
                    "xid": xid or None,
                    "detail": detail,
                }
            )
    return out


def _pct(part: float | None, whole: float | None) -> float | None:
    if part is None or not whole:
        return None
    return 100.0 * part / whole


def _gpu_names(names: list[str]) -> str:
    return f"GPU {names[0]}" if len(names) == 1 else "GPUs " + ", ".join(names)


def _shares(pcts: list[float]) -> str:
    lo, hi = round(min(pcts)), round(max(pcts))
    return f"{lo} %" if lo == hi else f"{lo}–{hi} %"


def verdict(per_gpu: list[dict[str, Any]], events: list[dict[str, Any]]) -> list[str]:
    """What a person should look at first, in words; one line per finding, the GPUs with the
    same finding named together (eight GPUs under the power cap are one line, not eight)."""
    several_nodes = len({g.get("node") for g in per_gpu}) > 1
    # finding (a template with {gpus} and {share}) -> [(GPU name, share %)], in first-seen order
    found: dict[str, list[tuple[str, float]]] = {}
    for g in per_gpu:
        span = g.get("duration_s")
        name = f"{g['node']}:{g['gpu']}" if several_nodes else str(g["gpu"])
        idle = _pct(g.get("idle_s"), span)
        if idle is not None and idle >= IDLE_SHARE * 100:
            found.setdefault("{gpus} idle {share} of the job", []).append((name, idle))
        for reason, seconds in (g.get("throttle_s") or {}).items():
            share = _pct(seconds, span)
            if reason in THROTTLE_NAMES and share is not None and share >= THROTTLE_SHARE * 100:
                words = REASON_WORDS.get(reason, reason)
                key = "{gpus} throttled by " + words + " {share} of the time"
                found.setdefault(key, []).append((name, share))
        stalled = _pct(g.get("stalled_s"), span)
        if stalled is not None and stalled >= STALLED_SHARE * 100:
            key = (
                "{gpus} busy but stalled {share} of the time (utilization ≥ "
                f"{STALLED_UTIL_PCT:g} % with SM activity < {STALLED_SM_PCT:g} %)"
            )
            found.setdefault(key, []).append((name, stalled))
    lines = [
        key.format(gpus=_gpu_names([n for n, _ in hits]), share=_shares([p for _, p in hits]))
        for key, hits in found.items()
    ]
    xids: dict[str, list[str]] = {}
    for e in events:
        what = f"Xid {e['xid']}" if e.get("xid") else str(e["event"])
        where = f"{e['node']}:{e['gpu']}" if several_nodes else str(e["gpu"])
        xids.setdefault(what, []).append(where)
    for what, on in sorted(xids.items()):
        times = f"{len(on)}×" if len(on) > 1 else "once"
        lines.append(f"{what} {times} on {_gpu_names(list(dict.fromkeys(on)))}")
    if not lines and per_gpu:
        means = [g["util_mean_pct"] for g in per_gpu if g.get("util_mean_pct") is not None]
        mean = f"mean utilization {sum(means) / len(means):.0f} %, " if means else ""
        lines.append(f"{mean}no idle GPU, no throttling, no GPU events")
    return lines


def build_job(
    paths: list[Path],
    alloc_id: str,
    idle_util: float = 5.0,
    con: Any = None,
) -> Job:
    """The job's figures, or UnknownAllocation when nothing under ``paths`` carries the id."""
    from gputel.analysis.report import build_report

    paths = list(paths)
    con = con or duck.connect()
    files = duck.find_files(paths)  # one walk of the trees, for the report and the job
    report = build_report(paths, ReportFilter(allocation=alloc_id), idle_util, con=con, found=files)
    recorded = next((a for a in report["allocations"] if a["id"] == alloc_id), None)
    summary = _summary_rows(files, alloc_id)
    if recorded is None and not summary:
        raise UnknownAllocation(alloc_id, known_ids(files))
    names = {
        (node, gpu): (uuid or "", name or "")
        for node, gpu, uuid, name in con.execute(
            "SELECT f.node, g.gpu, arg_min(g.uuid, g.t0), arg_min(g.name, g.t0) "
            "FROM au g JOIN g_files f USING (fid) GROUP BY ALL"
        ).fetchall()
    }
    per_gpu = []
    for g in (recorded or {}).get("per_gpu", []):
        uuid, name = names.get((g["node"], g["gpu"]), ("", ""))
        per_gpu.append({"node": g["node"], "gpu": g["gpu"], "uuid": uuid, "name": name, **g})
    start = end = None
    duration: float | None = None
    gpus: list[int] = []
    nodes: list[str] = []
    energy: float | None = None
    source: str | None = None
    if recorded is not None:
        start, end, duration = recorded["start"], recorded["end"], recorded["duration_s"]
        gpus, nodes = list(recorded["gpus"]), list(recorded["nodes"])
        energy, source = recorded["energy_j"], "recorded rows"
    if summary:
        last = summary[-1]
        start, end = last.get("start") or start, last.get("end") or end
        duration = _float(last.get("duration_s")) or duration
        gpus = gpus or [int(x) for x in (last.get("gpus") or "").split(";") if x.isdigit()]
        if _float(last.get("energy_j")) is not None:
            energy, source = _float(last.get("energy_j")), SUMMARY_FILE
        elif last.get("shared") == "1":
            # A detected job that shared a GPU with another: the GPU's energy cannot be split
            # between them (docs/attribution.md), so the job has none, not the GPU's whole.
            energy, source = None, SHARED
    first = _ts(start or "") if start else None
    last_ts = _ts(end or "") if end else None
    processes: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    if first is not None and last_ts is not None:
        # The row at ``end`` stands for the interval that ends at it; a process sampled in the
        # same tick as the last row is the job's.
        processes = _processes(files, nodes, gpus, first, last_ts)
        events = _events(con, alloc_id, nodes, gpus, first, last_ts)
    users = sorted({p["user"] for p in processes if p["user"]})
    return Job(
        id=alloc_id,
        start=start,
        end=end,
        duration_s=duration,
        nodes=nodes,
        gpus=gpus,
        energy_j=energy,
        energy_source=source,
        recorded=None
        if recorded is None
        else {k: v for k, v in recorded.items() if k != "per_gpu"},
        per_gpu=per_gpu,
        summary=summary,
        processes=processes,
        users=users,
        events=events,
        verdict=verdict(per_gpu, events),
    )
