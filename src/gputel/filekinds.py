"""Every kind of CSV file gputel writes: its name, its header and the type of each column.

The headers are the writers' own (the schema table's ``*_CSV_COLUMNS``, and the ``COLUMNS`` of
the appended logs), and the measurement columns take their types from the schema table, so a
column added to a writer is known here at once. What no table says is the type of the identity
columns (timestamps, indices, flags, names); :data:`COLUMN_TYPES` gives each of them once, by
name. A column with neither is text (``VARCHAR``), and a test fails until it is given a type.

The analysis commands find files and the Parquet export copies them through this list.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gputel.allocstats import STAT_FIELDS
from gputel.control.allocations import SUMMARY_COLUMNS, SUMMARY_FILE
from gputel.schema import (
    GPU_CSV_COLUMNS,
    GPU_FIELDS,
    HOST_CSV_COLUMNS,
    HOST_FIELDS,
    MIG_CSV_COLUMNS,
    MIG_FIELDS,
    PROCESS_CSV_COLUMNS,
    Field,
)
from gputel.supervisor import events, transitions_log

TIMESTAMP = "TIMESTAMPTZ"
"""A UTC instant (Parquet: ``TIMESTAMP(isAdjustedToUTC=true)``); every CSV time is UTC."""

#: Types of the columns that are not measurements of the schema table, by column name (a name
#: means the same thing in every file it appears in).
COLUMN_TYPES: dict[str, str] = {
    "timestamp": TIMESTAMP,
    "start": TIMESTAMP,
    "end": TIMESTAMP,
    "gpu": "INTEGER",
    "gi": "INTEGER",
    "ci": "INTEGER",
    "pid": "BIGINT",
    "xid": "INTEGER",
    "lost": "BOOLEAN",
    "pretrigger": "BOOLEAN",
    "shared": "BOOLEAN",
    "duration_s": "DOUBLE",
    "energy_j": "DOUBLE",
    "memory_used_mib": "DOUBLE",
    "sm_util_pct": "DOUBLE",
    **{name: "DOUBLE" for name in STAT_FIELDS},
    # Ids and names stay text: an allocation id ``0042`` is not the number 42; lists (``gpus``,
    # ``xids``: ``0;1``) too.
    **{
        name: "VARCHAR"
        for name in (
            "uuid",
            "name",
            "mig_uuid",
            "allocations",
            "user",
            "command",
            "job",
            "event",
            "detail",
            "from_state",
            "to_state",
            "reason",
            "id",
            "gpus",
            "xids",
            "release_reason",
        )
    },
}


def _field_types(table: Iterable[Field]) -> dict[str, str]:
    return {f.csv: "BIGINT" if f.type is int else "DOUBLE" for f in table}


@dataclass(frozen=True)
class FileKind:
    """One kind of file: ``name`` is also the file name's prefix (``gpu-…csv``, ``events.csv``)."""

    name: str
    columns: tuple[str, ...]
    """The header this version writes, in order."""
    measured: dict[str, str]
    """Types of the schema table's columns of this kind."""
    session: bool
    """One file per recorder session (and day, and size cap), named ``<kind>-<stamp>-<host>``:
    its counters (``energy_j``) start with the file. Otherwise one appended log per node."""
    time_column: str = "timestamp"
    """The column that places a row on a date."""

    def type_of(self, column: str) -> str:
        return self.measured.get(column) or COLUMN_TYPES.get(column) or "VARCHAR"

    def untyped(self) -> list[str]:
        """Columns that fall back to text because no table names their type."""
        return [c for c in self.columns if c not in self.measured and c not in COLUMN_TYPES]


KINDS: tuple[FileKind, ...] = (
    FileKind("gpu", GPU_CSV_COLUMNS, _field_types(GPU_FIELDS), session=True),
    FileKind("host", HOST_CSV_COLUMNS, _field_types(HOST_FIELDS), session=True),
    FileKind("mig", MIG_CSV_COLUMNS, _field_types(MIG_FIELDS), session=True),
    FileKind("processes", PROCESS_CSV_COLUMNS, {}, session=True),
    FileKind(events.EVENTS_FILE.removesuffix(".csv"), events.COLUMNS, {}, session=False),
    FileKind(
        transitions_log.TRANSITIONS_FILE.removesuffix(".csv"),
        transitions_log.COLUMNS,
        {},
        session=False,
    ),
    FileKind(
        SUMMARY_FILE.removesuffix(".csv"), SUMMARY_COLUMNS, {}, session=False, time_column="start"
    ),
)
KIND_BY_NAME = {k.name: k for k in KINDS}
