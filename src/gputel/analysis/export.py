"""``gputel export --parquet``: the recorded CSVs as a Hive-partitioned Parquet dataset.

For fleets whose data outgrows one machine: ``OUT/<kind>/node=<node>/date=<YYYY-MM-DD>/*.parquet``
(zstd), with typed columns (``timestamp`` as a UTC TIMESTAMP, numbers as DOUBLE, the clock
reason bitmask as BIGINT, ids as text), which DuckDB, Spark and Trino read as they are. The rows
are the ones :mod:`gputel.analysis.duck` loads, so a damaged file is refused the same way.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from gputel.analysis import duck
from gputel.analysis.filter import ReportFilter

KINDS = ("gpu", "host", "events")


class ExportRefused(ValueError):
    """OUT is not empty and overwriting was not asked for."""


def export_parquet(
    paths: list[Path], out: Path, overwrite: bool = False, con: Any = None
) -> dict[str, int]:
    """Write one dataset per file kind under ``out``; returns the rows written per kind."""
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportRefused(f"{out} is not empty (use --overwrite to replace its datasets)")
    con = con or duck.connect()
    import duckdb

    fs = duck.find_files(paths)
    written: dict[str, int] = {}
    for kind in KINDS:
        if not fs.files[kind]:
            continue
        rows = duck.load(con, fs, kind, ReportFilter())
        if not rows:
            continue
        target = out / kind
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        try:
            con.execute(_COPY.format(kind=kind, target=duck.quote(str(target))))
        except duckdb.Error as exc:
            raise OSError(str(exc).split("\n", 1)[0]) from None
        written[kind] = rows
    return written


_COPY = (
    "COPY (SELECT * EXCLUDE (fid, ts), "
    "make_timestamp(CAST(round(ts * 1e6) AS BIGINT)) AS timestamp, "
    "strftime(make_timestamp(CAST(round(ts * 1e6) AS BIGINT)), '%Y-%m-%d') AS date "
    "FROM {kind}) TO {target} "
    "(FORMAT parquet, PARTITION_BY (node, date), COMPRESSION zstd, OVERWRITE_OR_IGNORE)"
)
