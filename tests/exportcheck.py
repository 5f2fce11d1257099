"""What the export tests compare: every CSV row of a log tree against the Parquet dataset."""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb

from gputel.analysis import duck
from gputel.filekinds import KINDS, TIMESTAMP, FileKind
from gputel.formats import parse_iso_utc


def _cell(value: str, sql_type: str) -> Any:
    if value == "":
        return None
    if sql_type == "DOUBLE":
        return float(value)
    if sql_type in ("BIGINT", "INTEGER"):
        return int(value)
    if sql_type == "BOOLEAN":
        assert value in ("0", "1"), value
        return value == "1"
    if sql_type == TIMESTAMP:
        return parse_iso_utc(value)
    return value


def _read(path: Path) -> tuple[list[str], list[list[str]]]:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    rows = list(csv.reader(io.StringIO(data.decode(), newline="")))
    return rows[0], rows[1:]


def csv_rows(logs: list[Path]) -> dict[str, tuple[set[str], Counter[tuple[Any, ...]]]]:
    """Per kind: the columns of every file's header, and every row as the export should hold it
    (the kind's columns, typed, then ``session`` where the kind has one, then ``node``)."""
    fs = duck.find_files(logs)
    out: dict[str, tuple[set[str], Counter[tuple[Any, ...]]]] = {}
    for kind in KINDS:
        headers: set[str] = set()
        rows: Counter[tuple[Any, ...]] = Counter()
        for path in fs.files[kind.name]:
            header, body = _read(path)
            headers.update(header)
            for r in body:
                cells = dict(zip(header, r, strict=True))
                key = [_cell(cells.get(c, ""), kind.type_of(c)) for c in kind.columns]
                if kind.session:
                    key.append(path.name.split(".csv")[0] + ".csv")
                key.append(fs.nodes[path])
                rows[tuple(key)] += 1
        out[kind.name] = (headers, rows)
    return out


def dataset(out: Path, kind: FileKind) -> tuple[dict[str, str], Counter[tuple[Any, ...]]]:
    """The dataset of ``kind``: its column types, and its rows as :func:`csv_rows` gives them."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    rel = (
        f"read_parquet('{out}/{kind.name}/**/*.parquet', hive_partitioning = true, "
        "union_by_name = true)"
    )
    types = dict(
        con.execute(
            f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM {rel})"
        ).fetchall()
    )
    cols = [*kind.columns, *(["session"] if kind.session else []), "node"]
    select = ", ".join(f'"{c}"' for c in cols)
    rows = Counter(tuple(r) for r in con.execute(f"SELECT {select} FROM {rel}").fetchall())
    return types, rows


def assert_dataset_equals_csvs(out: Path, logs: list[Path]) -> dict[str, int]:
    """Every kind: every CSV column present and typed, every row present once with the CSV's
    values, times UTC-aware. Returns the rows per kind."""
    expected = csv_rows(logs)
    counts = {}
    for kind in KINDS:
        headers, rows = expected[kind.name]
        if not rows:
            assert not (out / kind.name).exists() or not list((out / kind.name).rglob("*.parquet"))
            counts[kind.name] = 0
            continue
        types, got = dataset(out, kind)
        missing = headers - set(types)
        assert not missing, f"{kind.name}: CSV columns not exported: {sorted(missing)}"
        for c in kind.columns:
            want = kind.type_of(c)
            assert types[c] == ("TIMESTAMP WITH TIME ZONE" if want == TIMESTAMP else want), c
        for r in got:
            for c, v in zip(kind.columns, r, strict=False):
                if kind.type_of(c) == TIMESTAMP and v is not None:
                    assert v.utcoffset() is not None and v.utcoffset().total_seconds() == 0
        assert got == rows, f"{kind.name}: {got - rows} more, {rows - got} missing"
        counts[kind.name] = sum(rows.values())
    return counts


def parquet_utc_flags(out: Path) -> set[str]:
    """The Parquet logical types of every timestamp column in the dataset."""
    con = duckdb.connect()
    found = con.execute(
        f"SELECT DISTINCT logical_type FROM parquet_schema('{out}/*/**/*.parquet') "
        "WHERE logical_type LIKE 'TimestampType%'"
    ).fetchall()
    return {r[0] for r in found}
