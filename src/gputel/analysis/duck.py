"""Recorded CSVs loaded into DuckDB: one typed table per file kind, every cell checked.

The analysis commands run their arithmetic as SQL over these tables instead of parsing rows in
Python (an order of magnitude faster, and it grows with the machine). DuckDB is an optional
extra, so nothing on the agent's or the recorder's path imports this module.

Only the numeric columns are given types; every other cell stays text (``VARCHAR``), so
allocation ids such as ``0042`` or ``NA`` stay strings. A cell that does not cast stops the load;
the files are then read again with each cell checked in SQL, so the error is one line naming the
damaged file, never a silently dropped row. Files written by older versions may lack columns:
each batch of files reads one header, and a column a batch lacks is NULL, which the analysis
treats like an empty cell (no value).
"""

from __future__ import annotations

import gzip
import io
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gputel.analysis.filter import CsvReadError, ReportFilter
from gputel.filekinds import KINDS


def install_hint() -> str:
    """The command that installs the ``analysis`` extra into the Python running gputel.

    ``pip install 'gputel[analysis]'`` works only where gputel came from a package index; from
    a checkout (``pip install -e .`` or ``pip install DIR``) pip must be pointed at that
    directory again, which the installed distribution's ``direct_url.json`` (PEP 610) names.
    """
    from importlib import metadata

    try:
        raw = metadata.distribution("gputel").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        raw = None
    return hint_from_direct_url(raw)


def hint_from_direct_url(raw: str | None) -> str:
    """:func:`install_hint` for an installed distribution's ``direct_url.json`` text (None: none,
    as for a package from an index)."""
    import json
    import shlex
    import sys
    from urllib.parse import unquote, urlparse

    pip = f"{shlex.quote(sys.executable)} -m pip install"
    if raw:
        try:
            origin = json.loads(raw)
        except ValueError:
            origin = {}
        if not isinstance(origin, dict):
            origin = {}
        url = urlparse(str(origin.get("url", "")))
        if url.scheme == "file" and url.path:
            editable = (origin.get("dir_info") or {}).get("editable") is True
            target = shlex.quote(f"{unquote(url.path)}[analysis]")
            return f"{pip} {'-e ' if editable else ''}{target}"
    return f"{pip} 'gputel[analysis]'"


#: Columns without which a file is not a gputel CSV of that kind.
REQUIRED = {
    "gpu": ("timestamp", "gpu", "utilization_gpu_pct"),
    "host": ("timestamp",),
    "events": ("timestamp", "gpu", "event"),
}

#: Numeric columns cast to DOUBLE, per kind (absent columns become NULL).
NUMERIC = {
    "gpu": (
        "utilization_gpu_pct",
        "memory_used_mib",
        "temperature_c",
        "power_w",
        "energy_j",
        "sm_active_pct",
        "tensor_active_pct",
    ),
    "host": ("cpu_util_pct", "cpu_package_power_w", "cpu_package_energy_j"),
    "events": (),
}
#: Integer columns (bitmasks).
INTEGER = {"gpu": ("clock_event_reasons",), "host": (), "events": ()}
#: Text columns kept as they are (ids stay strings).
TEXT = {
    "gpu": ("uuid", "name", "lost", "allocations", "pretrigger"),
    "host": (),
    "events": ("uuid", "event", "xid", "detail", "allocations"),
}

_SESSION_KINDS = tuple(k.name for k in KINDS if k.session)
_NAME_RE = re.compile(rf"^({'|'.join(k.name for k in KINDS)})(?:-.*)?\.csv(?:\.\d+)?(?:\.gz)?$")
_NODE_RE = re.compile(
    rf"^(?:{'|'.join(_SESSION_KINDS)})-\d{{8}}T\d{{6}}(?:\.\d+)?Z?-?(.*?)(?:_\d{{3}})?\.csv"
)


class AnalysisUnavailable(RuntimeError):
    """DuckDB (the ``analysis`` extra) is not installed."""


#: DuckDB's memory ceiling; beyond it, tables and sorts spill to a temporary directory, so a
#: fleet's worth of rows fits on a small machine.
MEMORY_LIMIT = "640MB"


def connect(threads: int | None = None) -> Any:
    """An in-memory DuckDB connection, or AnalysisUnavailable saying how to install it."""
    try:
        import duckdb
    except ImportError:
        raise AnalysisUnavailable(f"this command needs DuckDB: {install_hint()}") from None
    con = duckdb.connect(":memory:")
    con.execute("SET preserve_insertion_order = false")
    # Errors are one line on stderr; a long scan must not draw a progress bar there.
    con.execute("SET enable_progress_bar = false")
    con.execute(f"SET memory_limit = '{MEMORY_LIMIT}'")
    # Spill files go to the system's temporary directory, not the caller's working directory.
    spill = Path(tempfile.gettempdir()) / f"gputel-duckdb-{os.getpid()}"
    con.execute(f"SET temp_directory = {quote(str(spill))}")
    if threads:
        con.execute(f"SET threads = {int(threads)}")
    return con


def file_kind(path: Path) -> str | None:
    """The file kind (``gpu``, ``events``, … of :data:`gputel.filekinds.KINDS`) from a file's
    name, rotated and .gz included."""
    m = _NAME_RE.match(path.name)
    return m.group(1) if m else None


def node_of(path: Path) -> str:
    """The node a file belongs to, from the recorder's name ``gpu-<stamp>-<host>[_NNN].csv``.

    ``events.csv`` (and the other appended logs) carries no host in its name; it belongs to the
    node whose files share its directory, else to the directory's name.
    """
    m = _NODE_RE.match(path.name)
    return m.group(1) if m else ""


@dataclass
class FileSet:
    """The files of each kind found under the given paths, with their nodes."""

    files: dict[str, list[Path]]
    nodes: dict[Path, str]


def find_files(paths: Iterable[Path]) -> FileSet:
    """Every gputel CSV under ``paths`` (directory trees searched, files taken as given)."""
    found: dict[str, set[Path]] = {k.name: set() for k in KINDS}
    for p in paths:
        if p.is_dir():
            candidates: Iterable[Path] = (f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            candidates = [p]
        else:
            raise CsvReadError(f"{p}: no such file or directory")
        for f in candidates:
            kind = file_kind(f)
            if kind:
                found[kind].add(f)
    nodes: dict[Path, str] = {}
    by_dir: dict[Path, str] = {}
    for kind in _SESSION_KINDS:
        for f in sorted(found[kind]):
            nodes[f] = node_of(f)
            by_dir.setdefault(f.parent, nodes[f])
    for kind in (k.name for k in KINDS if not k.session):
        for f in found[kind]:
            nodes[f] = by_dir.get(f.parent, f.parent.name)
    return FileSet({k: sorted(v) for k, v in found.items()}, nodes)


def open_bytes(path: Path) -> BinaryIO:
    """A CSV file for reading, gzip-compressed or not (by its content, not its name)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")  # type: ignore[return-value]


def open_text(path: Path) -> io.TextIOBase:
    """:func:`open_bytes` as UTF-8 text, line ends kept for the csv module."""
    return io.TextIOWrapper(open_bytes(path), encoding="utf-8", newline="")


def _header(path: Path, kind: str) -> list[str] | None:
    """The header of a file with at least one data row, None for an empty file."""
    try:
        with open_text(path) as fh:
            header = fh.readline().strip("\r\n").split(",")
            if not fh.readline().strip():
                return None
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile) as exc:
        raise CsvReadError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None
    missing = [c for c in REQUIRED[kind] if c not in header]
    if missing:
        raise CsvReadError(f"{path}: not a gputel CSV (missing columns {', '.join(missing)})")
    return header


def quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _checked_double(col: str) -> str:
    return (
        f"CASE WHEN {col} IS NULL THEN NULL "
        f"WHEN try_cast({col} AS DOUBLE) IS NULL "
        f"THEN error(filename || ': bad number ' || {col}) "
        f"ELSE try_cast({col} AS DOUBLE) END"
    )


def _checked_int(col: str) -> str:
    return (
        f"CASE WHEN {col} IS NULL THEN NULL "
        f"WHEN try_cast({col} AS BIGINT) IS NULL "
        f"THEN error(filename || ': bad integer ' || {col}) "
        f"ELSE try_cast({col} AS BIGINT) END"
    )


def load(
    con: Any,
    fs: FileSet,
    kind: str,
    flt: ReportFilter,
    table: str | None = None,
    wrap: Callable[[str], str] | None = None,
) -> int:
    """Create table ``kind`` (or ``table``) from the files of ``kind``; returns its row count.

    Columns: ``fid`` (index into ``{table}_files(fid, path, node)``), ``node``, ``ts`` (epoch
    seconds, DOUBLE), ``gpu`` (INTEGER, not for host files) and the kind's numeric and text
    columns. ``flt`` keeps the time range and GPU indices. ``wrap`` turns that SELECT into the
    one the table is made of (a grouping or a narrower selection, in the same pass, no copy of
    the rows); it is applied to one batch of files at a time, so it must not combine rows of
    different files. A damaged cell raises CsvReadError naming the file.
    """
    table = table or kind
    headers = {p: _header(p, kind) for p in fs.files[kind]}
    paths = [p for p, h in headers.items() if h is not None]
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE {table}_files (fid INTEGER, path VARCHAR, node VARCHAR)"
    )
    if paths:
        con.executemany(
            f"INSERT INTO {table}_files VALUES (?, ?, ?)",
            [(i, str(p), fs.nodes[p]) for i, p in enumerate(paths)],
        )
    where = []
    if flt.since is not None:
        where.append(f"ts >= {flt.since!r}")
    if flt.until is not None:
        where.append(f"ts <= {flt.until!r}")
    if flt.gpus is not None and kind != "host":
        where.append(f"gpu IN ({', '.join(str(g) for g in sorted(flt.gpus)) or 'NULL'})")
    wrap = wrap or (lambda inner: inner)
    if not paths:
        inner = (
            "SELECT * FROM (SELECT 0 AS fid, '' AS node, 0.0::DOUBLE AS ts"
            + (", 0 AS gpu" if kind != "host" else "")
            + "".join(f", NULL::DOUBLE AS {c}" for c in NUMERIC[kind])
            + "".join(f", NULL::BIGINT AS {c}" for c in INTEGER[kind])
            + "".join(f", NULL::VARCHAR AS {c}" for c in TEXT[kind])
            + ") WHERE false"
        )
        con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS {wrap(inner)}")
        return 0
    for n, (header, batch) in enumerate(_batches(paths, headers)):
        verb = f"CREATE OR REPLACE TEMP TABLE {table} AS" if n == 0 else f"INSERT INTO {table}"
        _load_batch(con, kind, table, batch, header, where, wrap, verb)
    return int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


#: CSV read per statement: a grouping wrap keeps one hash table per statement, and groups never
#: span files, so a fleet's files are read a batch at a time (same result, bounded memory).
BATCH_BYTES = 512 * 2**20
#: How much larger than its size on disk a gzipped CSV reads.
GZIP_RATIO = 8


def _batches(
    paths: Sequence[Path], headers: dict[Path, list[str] | None]
) -> list[tuple[list[str], list[Path]]]:
    """Files with one header at a time, up to ``BATCH_BYTES`` of CSV: each read names its
    columns instead of reconciling the files' headers (older files lack newer columns)."""
    by_header: dict[tuple[str, ...], list[Path]] = {}
    for p in paths:
        by_header.setdefault(tuple(headers[p] or ()), []).append(p)
    batches: list[tuple[list[str], list[Path]]] = []
    for header, files in by_header.items():
        size = BATCH_BYTES
        for p in files:
            est = p.stat().st_size * (GZIP_RATIO if p.name.endswith(".gz") else 1)
            if size + est > BATCH_BYTES:
                batches.append((list(header), []))
                size = 0
            batches[-1][1].append(p)
            size += est
    return batches


def _load_batch(
    con: Any,
    kind: str,
    table: str,
    paths: Sequence[Path],
    header: list[str],
    where: list[str],
    wrap: Callable[[str], str],
    verb: str,
) -> None:
    """Read one batch of files, all with ``header``, into ``table`` (``verb``: create it, or
    insert into it)."""
    present = set(header)
    select = [
        "f.fid AS fid",
        "f.node AS node",
        f"{_ts_expr()} AS ts",
    ]
    if kind != "host":
        # An event on no selected GPU (an NVSwitch's SXid) has an empty gpu; a reading never.
        empty = "WHEN r.gpu IS NULL THEN NULL " if kind == "events" else ""
        select.append(
            f"CASE {empty}WHEN regexp_full_match(r.gpu, '[0-9]+') THEN CAST(r.gpu AS INTEGER) "
            "ELSE error(filename || ': bad GPU index ' || coalesce(r.gpu, '(empty)')) END AS gpu"
        )
    for c in NUMERIC[kind]:
        select.append(
            f"{_checked_double('r.' + c)} AS {c}" if c in present else f"NULL::DOUBLE AS {c}"
        )
    for c in INTEGER[kind]:
        select.append(
            f"{_checked_int('r.' + c)} AS {c}" if c in present else f"NULL::BIGINT AS {c}"
        )
    for c in TEXT[kind]:
        select.append(f"r.{c} AS {c}" if c in present else f"NULL::VARCHAR AS {c}")
    # Fast path: DuckDB casts while parsing. Only if that fails is the file set read again with
    # every cell checked by hand, which turns the failure into one line naming the file.
    types = {"timestamp": "TIMESTAMP"}
    if kind != "host":
        types["gpu"] = "INTEGER"
    types.update({c: "DOUBLE" for c in NUMERIC[kind] if c in present})
    types.update({c: "BIGINT" for c in INTEGER[kind] if c in present})
    fast = ["f.fid AS fid", "f.node AS node", "epoch_us(r.timestamp) / 1e6 AS ts"]
    fast += ["r.gpu AS gpu"] if kind != "host" else []
    fast += [
        f"r.{c} AS {c}" if c in present else f"NULL::{t} AS {c}"
        for cols, t in ((NUMERIC[kind], "DOUBLE"), (INTEGER[kind], "BIGINT"))
        for c in cols
    ]
    fast += [f"r.{c} AS {c}" if c in present else f"NULL::VARCHAR AS {c}" for c in TEXT[kind]]
    filters = f"{'WHERE ' + ' AND '.join(where) if where else ''}"
    join = f"JOIN {table}_files f ON r.filename = f.path"
    inner = (
        f"SELECT * FROM (SELECT {', '.join(fast)} "
        f"FROM {_read_csv_sql(paths, header, types)} r {join}) {filters}"
    )
    import duckdb

    try:
        con.execute(f"{verb} {wrap(inner)}")
    except duckdb.Error as exc:
        checked = (
            f"SELECT * FROM (SELECT {', '.join(select)} "
            f"FROM {_read_csv_sql(paths, header)} r {join}) {filters}"
        )
        _run(con, f"{verb} {wrap(checked)}", paths)
        if not str(exc).startswith("Conversion Error"):
            raise CsvReadError(_one_line(str(exc), paths)) from None


def _ts_expr() -> str:
    return (
        "CASE WHEN r.timestamp LIKE '____-__-__T__:__:__%Z' "
        "AND try_cast(r.timestamp AS TIMESTAMP) IS NOT NULL "
        "THEN epoch_us(CAST(r.timestamp AS TIMESTAMP)) / 1e6 "
        "ELSE error(filename || ': bad timestamp ' || coalesce(r.timestamp, '(empty)')) END"
    )


def _read_csv_sql(
    paths: Sequence[Path], header: list[str], types: dict[str, str] | None = None
) -> str:
    """The files' columns named as their header gives them; text unless ``types`` says."""
    types = types or {}
    # A name that repeats is read under ``name_N`` (as DuckDB's own detection names it): the
    # first of them is the column.
    seen: dict[str, int] = {}
    names: list[str] = []
    for c in header:
        names.append(f"{c}_{seen[c]}" if c in seen else c)
        seen[c] = seen.get(c, 0) + 1
    columns = ", ".join(
        f"{quote(n)}: {quote(types.get(n, 'VARCHAR') if n == c else 'VARCHAR')}"
        for n, c in zip(names, header, strict=True)
    )
    return (
        "read_csv(["
        + ", ".join(quote(str(p)) for p in paths)
        + "], header = true, auto_detect = false, filename = true, "
        "delim = ',', quote = '\"', escape = '\"', null_padding = false, "
        "columns = {" + columns + "})"
    )


def _run(con: Any, sql: str, paths: Sequence[Path]) -> None:
    """Run a load; DuckDB's error becomes one line naming the damaged file."""
    import duckdb

    try:
        con.execute(sql)
    except duckdb.Error as exc:
        raise CsvReadError(_one_line(str(exc), paths)) from None


def _one_line(message: str, paths: Sequence[Path]) -> str:
    text = message.split("\n", 1)[0]
    text = re.sub(r"^[A-Za-z ]*Error: ", "", text)
    for p in paths:
        if text.startswith(f"{p}:"):
            return text
    named = [p for p in paths if str(p) in message]
    if named:
        return f"{named[0]}: unreadable ({text})"
    return f"{', '.join(str(p) for p in paths[:3])}{' …' if len(paths) > 3 else ''}: {text}"
