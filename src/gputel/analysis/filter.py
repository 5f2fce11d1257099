"""What an analysis looks at, and the one error a damaged input file becomes."""

from __future__ import annotations

from dataclasses import dataclass


class CsvReadError(ValueError):
    """A file that is not a gputel CSV of the expected kind, or a damaged cell in one."""


@dataclass(frozen=True)
class ReportFilter:
    """Which rows an analysis looks at: a time range, GPU indices, one allocation."""

    since: float | None = None
    until: float | None = None
    gpus: frozenset[int] | None = None
    allocation: str | None = None
