"""Rows that could not be written, per file: for ``gputel status`` and ``/metrics``.

Each writer counts its own failures (``formats.FailureCounter``); this module only gathers them:
the agent's appended files (``transitions.csv``, ``events.csv``, ``allocations.csv``) from the
agent, and the recorder's (its per-second CSV files and the detected jobs' ``allocations.csv``
rows) from its heartbeat, ``recorder.json`` ``write_failures``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from gputel.formats import FailureCounter
from gputel.telemetry.promtext import Family

#: How the recorder names its per-second files in its entries.
RECORDER_CSV = "gpu/host/processes CSV"

ROWS_FAILED = Family(
    "gputel_file_rows_failed_total",
    "counter",
    "Rows the agent could not append to a file of its own (disk full, read-only or missing "
    "directory), by file.",
)
FAILING = Family(
    "gputel_file_write_failing",
    "gauge",
    "1 while the agent's rows to a file are failing to be written, by file.",
)


def entries(counters: Iterable[tuple[str, FailureCounter]], who: str) -> list[dict[str, Any]]:
    """Status entries of the counters that lost a row, each with ``writer`` (who writes it)."""
    out = []
    for name, counter in counters:
        entry = counter.status(name)
        if entry is not None:
            out.append({**entry, "writer": who})
    return out


def from_heartbeat(heartbeat: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The recorder's entries from its ``recorder.json`` (malformed ones skipped)."""
    items = (heartbeat or {}).get("write_failures")
    if not isinstance(items, list):
        return []
    keys = ("file", "failing", "since", "rows_failed", "error")
    return [
        {**{k: e.get(k) for k in keys}, "writer": "recorder"}
        for e in items
        if isinstance(e, dict) and isinstance(e.get("file"), str)
    ]
