"""What an analysis looks at, the one error a damaged input file becomes, and the one error an
unknown allocation id becomes."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

#: How many close ids an unknown allocation id's error names.
CLOSEST = 3


class CsvReadError(ValueError):
    """A file that is not a gputel CSV of the expected kind, or a damaged cell in one."""


@dataclass(frozen=True)
class ReportFilter:
    """Which rows an analysis looks at: a time range, GPU indices, one allocation."""

    since: float | None = None
    until: float | None = None
    gpus: frozenset[int] | None = None
    allocation: str | None = None


class UnknownAllocation(ValueError):
    """No row or summary carries the id; the message names it and the closest ids found."""

    def __init__(self, alloc_id: str, known: list[str]) -> None:
        close = difflib.get_close_matches(alloc_id, known, n=CLOSEST, cutoff=0.4)
        if close:
            hint = "closest: " + ", ".join(close)
        elif known:
            hint = f"{len(known)} allocation(s) recorded, none close"
        else:
            hint = "no allocation recorded there"
        super().__init__(f"no allocation {alloc_id!r} in the given files ({hint})")
        self.closest = close
