"""The words of ``gputel job``: one :class:`~gputel.analysis.job.Job` as lines for a terminal and
as rows for the page (:mod:`gputel.analysis.job_html`), so both say the same thing.

Short labelled lines rather than a table: nothing is cut at 80 columns.
"""

from __future__ import annotations

import textwrap
from typing import Any

from gputel.analysis.groups import JOULES_PER_KWH
from gputel.analysis.job import REASON_WORDS, THROTTLE_NAMES, Job
from gputel.formats import UNKNOWN, human_number


def num(value: Any, digits: int = 1) -> str:
    return human_number(value, digits)


def minutes(seconds: Any) -> str:
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        return UNKNOWN
    return human_number(seconds / 60, 1, " min")


def headline(job: Job) -> list[tuple[str, str]]:
    """(label, value) pairs: when, where, how long, energy."""
    where = ", ".join(job.nodes) or "unknown node"
    gpus = ", ".join(str(g) for g in job.gpus) or UNKNOWN
    energy = f"{UNKNOWN} ({job.energy_source})" if job.energy_source else UNKNOWN
    if job.energy_j is not None:
        kwh = job.energy_j / JOULES_PER_KWH
        energy = f"{job.energy_j:.0f} J ({kwh:.4f} kWh, {job.energy_source})"
        rows = (job.recorded or {}).get("energy_j")
        if job.energy_source != "recorded rows" and isinstance(rows, (int, float)):
            energy += f"; recorded rows {rows:.0f} J"
    users = ", ".join(job.users) or "none seen"
    return [
        ("when", f"{job.start or UNKNOWN} → {job.end or UNKNOWN}"),
        ("how long", f"{num(job.duration_s)} s ({minutes(job.duration_s)})"),
        ("where", f"{where}, GPU {gpus}"),
        ("energy", energy),
        ("users", users),
    ]


def throttle_words(g: dict[str, Any]) -> str:
    parts = [
        f"{REASON_WORDS.get(k, k)} {num(v, 0)} s"
        for k, v in (g.get("throttle_s") or {}).items()
        if k in THROTTLE_NAMES
    ]
    return ", ".join(parts) or "none"


def gpu_lines(g: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) pairs of one GPU's figures."""
    util = "/".join(num(g.get(k)) for k in ("util_mean_pct", "util_p95_pct", "util_max_pct"))
    sm = num(g.get("sm_active_mean_pct"))
    tensor = num(g.get("tensor_active_mean_pct"))
    power = f"{num(g.get('power_mean_w'))}/{num(g.get('power_peak_w'))}"
    return [
        ("utilization mean/p95/max", f"{util} %"),
        ("SM / tensor active mean", f"{sm} / {tensor} %"),
        ("idle", minutes(g.get("idle_s"))),
        ("busy but stalled", minutes(g.get("stalled_s"))),
        ("memory peak", f"{num(g.get('memory_peak_mib'), 0)} MiB"),
        (
            "temperature mean/max",
            f"{num(g.get('temperature_mean_c'))}/{num(g.get('temperature_max_c'))} °C",
        ),
        ("power mean/peak", f"{power} W"),
        ("energy", f"{num(g.get('energy_j'), 0)} J"),
        ("throttled", throttle_words(g)),
    ]


def process_line(p: dict[str, Any]) -> str:
    job = f" job {p['job']}" if p.get("job") else ""
    return (
        f"GPU {p['gpu']} pid {p['pid']} user {p['user'] or UNKNOWN}{job}: "
        f"{p['command'] or f'command {UNKNOWN}'} "
        f"(peak {num(p.get('memory_peak_mib'), 0)} MiB, {p['first']} → {p['last']})"
    )


def event_line(e: dict[str, Any]) -> str:
    what = f"Xid {e['xid']}" if e.get("xid") else e["event"]
    detail = f" {e['detail']}" if e.get("detail") else ""
    return f"{e['timestamp']} GPU {e['gpu']} {what}{detail}"


def lines(job: Job) -> list[str]:
    """The whole text view."""
    out = [f"job {job.id}"]
    out += [f"  {label}: {value}" for label, value in headline(job)]
    out.append("verdict:")
    out += [f"  - {v}" for v in job.verdict] or ["  - no recorded rows for this allocation"]
    for g in job.per_gpu:
        name = f" {g['name']}" if g.get("name") else ""
        out.append(f"GPU {g['gpu']}{name} ({g['node'] or f'node {UNKNOWN}'})")
        out += [f"  {label}: {value}" for label, value in gpu_lines(g)]
    out.append(f"processes ({len(job.processes)}):")
    out += [f"  {process_line(p)}" for p in job.processes]
    out.append(f"GPU events ({len(job.events)}):")
    out += [f"  {event_line(e)}" for e in job.events]
    for source, figures in sorted(job.sources.items()):
        out.append(f"{source}:")
        out += [f"  {k}: {v}" for k, v in figures.items()]
    return out


def wrapped(text_lines: list[str], width: int) -> list[str]:
    """Lines wrapped between words to ``width``, continuation lines indented under their
    line's text; a word longer than the width (a path, a command) is kept whole."""
    out: list[str] = []
    for line in text_lines:
        lead = line[: len(line) - len(line.lstrip())]
        bullet = "- " if line.lstrip().startswith("- ") else ""
        out += textwrap.wrap(
            line,
            width=max(20, width),
            subsequent_indent=lead + " " * len(bullet) + "  ",
            break_long_words=False,
            break_on_hyphens=False,
        ) or [line]
    return out
