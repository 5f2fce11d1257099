"""``gputel export --parquet``: every recorded CSV, losslessly, as a Hive-partitioned dataset.

For fleets whose data outgrows one machine. One dataset per file kind of
:data:`gputel.filekinds.KINDS`, ``OUT/<kind>/node=<node>/date=<YYYY-MM-DD>/*.parquet`` (zstd):
every column of the kind's header under its CSV name, typed as :mod:`gputel.filekinds` says
(times as UTC instants), a column a file of an older layout lacks NULL. Rows of per-session files
(``gpu``, ``host``, ``mig``, ``processes``) also carry ``session``, the source file's name, since
their counters (``energy_j``) start with the file. Text is copied as the CSV has it: a cell that
the writer neutralised against spreadsheet formulas keeps its leading ``'``.

Incremental by design: ``OUT/_gputel_export.json`` (the manifest, replaced atomically after each
file) remembers per source file how many rows went out and, for an uncompressed file, the byte
offset they end at. A later run exports only the rows after that, so it can run from a timer
while the recorder writes: a file still being written is exported up to its last whole row and
picked up there next time. A source file is known by its kind, directory and first row, so a
log that logrotate renamed or compressed is recognised, and a new ``events.csv`` is not taken
for the old one. Output files are named after the source and the first row they hold and are moved
into place only when whole, so a run that dies is repeated by the next one without duplicates.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gputel.analysis import duck
from gputel.analysis.filter import CsvReadError
from gputel.filekinds import KINDS, TIMESTAMP, FileKind
from gputel.runtime import atomic_write_json, read_json

MANIFEST = "_gputel_export.json"
"""In OUT, beside the datasets; engines skip names that start with ``_``."""
LOCK = "_gputel_export.lock"
MANIFEST_VERSION = 1
_CHUNK = 1 << 20

Mode = Literal["new", "incremental", "overwrite"]
#: Called after each source file with (bytes done, bytes in all).
Progress = Callable[[int, int], None]


class ExportRefused(ValueError):
    """OUT cannot take this export (not empty, no manifest, busy); ``str()`` says why."""


@dataclass(frozen=True)
class Source:
    """One CSV file to export, and how it is known in the manifest."""

    kind: FileKind
    path: Path
    node: str
    header_line: bytes
    key: str
    """``kind/<directory>/<hash of header and first row>``: the same for the file when logrotate
    renames or compresses it, and when the node it is filed under changes (an appended log in a
    directory without session files belongs to the directory's name until the first session)."""
    size: int

    @property
    def gz(self) -> bool:
        return self.path.name.endswith(".gz")

    @property
    def session(self) -> str:
        """The file's name as the recorder wrote it (without logrotate's ``.1``/``.gz``)."""
        return re.sub(r"\.csv(?:\.\d+)?(?:\.gz)?$", ".csv", self.path.name)


def export_parquet(
    paths: list[Path],
    out: Path,
    mode: Mode = "new",
    con: Any = None,
    progress: Progress | None = None,
) -> dict[str, int]:
    """Export the rows not exported yet; returns the rows written per kind (kinds with files)."""
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"{out} exists and is not a directory")
    if mode == "new" and _holds_anything(out):
        raise ExportRefused(
            f"{out} is not empty (use --incremental to add what is new, "
            "or --overwrite to replace it)"
        )
    if mode == "incremental" and _holds_anything(out) and not (out / MANIFEST).is_file():
        raise ExportRefused(
            f"{out} holds no gputel export ({MANIFEST} is missing); use --overwrite to replace it"
        )
    fs = duck.find_files(paths)
    sources = [
        s
        for kind in KINDS
        for p in fs.files[kind.name]
        if (s := _source(kind, p, fs.nodes[p])) is not None
    ]
    if not sources and mode != "incremental":
        return {}  # nothing to export: OUT is left as it was
    con = con or duck.connect()
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        for p in out.glob("_staging-*"):
            shutil.rmtree(p, ignore_errors=True)  # left by a run that died
        if mode == "overwrite":
            _clear(out)
        files = _load_manifest(out) if mode == "incremental" else {}
        # From here on OUT is an export: a run that fails is completed by --incremental.
        atomic_write_json(out / MANIFEST, {"version": MANIFEST_VERSION, "files": files})
        con.execute("SET TimeZone = 'UTC'")
        written = {k.name: 0 for k in KINDS if fs.files[k.name]}
        total = sum(s.size for s in sources)
        done = 0
        staging = out / f"_staging-{os.getpid()}"
        try:
            for s in sources:
                entry = _export_source(con, s, files.get(s.key), out, staging)
                if entry is not None:
                    written[s.kind.name] += entry["rows"] - files.get(s.key, {}).get("rows", 0)
                    files[s.key] = entry
                    atomic_write_json(out / MANIFEST, {"version": MANIFEST_VERSION, "files": files})
                done += s.size
                if progress:
                    progress(done, total)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return written


# ---------------------------------------------------------------------------------- OUT
def _holds_anything(out: Path) -> bool:
    """Anything but the lock file a failed first run may leave."""
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One export into OUT at a time (a timer's run and a hand-started one)."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportRefused(f"another export is writing {out}; try again later") from None
        yield
    finally:
        os.close(fd)


def _clear(out: Path) -> None:
    """--overwrite: the datasets, the manifest and any leftover staging go."""
    for kind in KINDS:
        shutil.rmtree(out / kind.name, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (out / MANIFEST).unlink()


def _load_manifest(out: Path) -> dict[str, dict[str, Any]]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    data = read_json(path)
    if (
        not isinstance(data, dict)
        or data.get("version") != MANIFEST_VERSION
        or not isinstance(data.get("files"), dict)
    ):
        raise ExportRefused(f"{path} is damaged or of another version; use --overwrite")
    return data["files"]


# ---------------------------------------------------------------------------------- sources
def _source(kind: FileKind, path: Path, node: str) -> Source | None:
    """The file as a source, or None while it has no whole row."""
    try:
        size = path.stat().st_size
        with duck.open_bytes(path) as fh:
            header = fh.readline()
            first = fh.readline()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise CsvReadError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None
    if not first.endswith(b"\n") or not first.strip():
        return None
    try:
        columns = header.decode().strip("\r\n").split(",")
    except UnicodeDecodeError:
        raise CsvReadError(f"{path}: unreadable (not UTF-8 text)") from None
    if kind.time_column not in columns:
        raise CsvReadError(f"{path}: not a gputel CSV (missing column {kind.time_column})")
    digest = hashlib.sha1(header + first, usedforsecurity=False).hexdigest()[:16]
    key = f"{kind.name}/{path.parent.resolve()}/{digest}"
    return Source(kind, path, node, header, key, size)


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1)


def _export_source(
    con: Any, s: Source, entry: dict[str, Any] | None, out: Path, staging: Path
) -> dict[str, Any] | None:
    """Export the rows of ``s`` after those ``entry`` says went out; the new entry, or None
    when there is nothing new."""
    done = int(entry["rows"]) if entry else 0
    offset = entry.get("offset") if entry else None
    if entry and entry.get("size") == s.size:
        return None  # unchanged since the last run (perhaps renamed, never rewritten)
    if done == 0 and (s.gz or _last_byte(s.path, s.size) == b"\n"):
        # The common case, a whole file not seen before: read it where it lies.
        try:
            rows: int | None = _copy(con, s, s.path, done, staging)
        except CsvReadError:
            if s.gz or s.path.stat().st_size == s.size:
                raise
            rows = None  # it grew while being read, and the read met half a row
        if rows is not None and (s.gz or s.path.stat().st_size == s.size):
            _publish(s.kind, staging, out)
            return _entry(s, rows, None if s.gz else s.size)
        # It grew while being read: the read may hold a partial last row. Drop it and read the
        # part that was whole before, as a slice.
        shutil.rmtree(staging / s.kind.name, ignore_errors=True)
    return _export_slice(con, s, done, offset, out, staging)


def _export_slice(
    con: Any, s: Source, done: int, offset: int | None, out: Path, staging: Path
) -> dict[str, Any] | None:
    """The whole rows after the first ``done`` (from byte ``offset`` where known), through a
    temporary copy with the header."""
    staging.mkdir(parents=True, exist_ok=True)
    tmp = staging / "slice.csv"
    rows = 0
    with duck.open_bytes(s.path) as src, open(tmp, "wb") as dst:
        dst.write(s.header_line)
        if offset is not None and not s.gz and offset <= s.size:
            src.seek(offset)
            start = offset
        else:
            src.readline()
            for _ in range(done):
                src.readline()
            start = src.tell() if not s.gz else -1
        limit = s.size - start if start >= 0 else None
        copied = 0
        tail = b""
        while limit is None or copied < limit:
            want = _CHUNK if limit is None else min(_CHUNK, limit - copied)
            chunk = src.read(want)
            if not chunk:
                break
            copied += len(chunk)
            data = tail + chunk
            cut = data.rfind(b"\n") + 1
            dst.write(data[:cut])
            rows += data.count(b"\n", 0, cut)
            tail = data[cut:]
    if rows == 0:
        tmp.unlink()
        return None
    got = _copy(con, s, tmp, done, staging)
    tmp.unlink()
    _publish(s.kind, staging, out)
    new_offset = None if s.gz or start < 0 else start + copied - len(tail)
    return _entry(s, done + got, new_offset)


def _entry(s: Source, rows: int, offset: int | None) -> dict[str, Any]:
    """What the manifest keeps of a source: rows out, where they end (uncompressed files), and
    the size it had, so an unchanged file is passed over without reading it."""
    return {"file": str(s.path), "rows": rows, "offset": offset, "size": s.size}


# ---------------------------------------------------------------------------------- copy
def _copy(con: Any, s: Source, csv: Path, first_row: int, staging: Path) -> int:
    """Write the rows of ``csv`` (a file with ``s``'s header) as Parquet files of ``s.kind``
    under ``staging`` (see :func:`_publish`); returns how many."""
    import duckdb

    header = s.header_line.decode().strip("\r\n").split(",")
    present = set(header)
    kind = s.kind
    types = {c: kind.type_of(c) for c in header if c in kind.columns}
    stem = s.session.removesuffix(".csv") if kind.session else kind.name
    pattern = f"{stem}-{s.key.rsplit('/', 1)[1]}-{first_row}_{{i}}"
    target = staging / kind.name
    shutil.rmtree(target, ignore_errors=True)
    staging.mkdir(parents=True, exist_ok=True)
    extra = [f"{duck.quote(s.session)} AS session"] if kind.session else []
    extra += [
        f"{duck.quote(s.node)} AS node",
        f"strftime({_ident(kind.time_column)}, '%Y-%m-%d') AS date",
    ]

    def query(checked: bool) -> str:
        cols = [
            (_checked(c, kind.type_of(c)) if checked else f"r.{_ident(c)}")
            if c in present
            else f"NULL::{kind.type_of(c)}"
            for c in kind.columns
        ]
        inner = ", ".join(f"{e} AS {_ident(c)}" for e, c in zip(cols, kind.columns, strict=True))
        source = duck._read_csv_sql([csv], header, None if checked else types)
        return f"SELECT *, {', '.join(extra)} FROM (SELECT {inner} FROM {source} r)"

    options = (
        f"(FORMAT parquet, COMPRESSION zstd, PARTITION_BY (node, date), "
        f"FILENAME_PATTERN {duck.quote(pattern)})"
    )

    def copy(select: str) -> str:
        return f"COPY ({select}) TO {duck.quote(str(target))} {options}"

    try:
        rows = int(con.execute(copy(query(False))).fetchone()[0])
    except duckdb.Error:
        # Read again with every cell checked: a bad cell is then named, with its file.
        shutil.rmtree(target, ignore_errors=True)
        try:
            rows = int(con.execute(copy(query(True))).fetchone()[0])
        except duckdb.IOException as exc:
            raise OSError(_one_line(str(exc), csv, s.path)) from None
        except duckdb.Error as exc:
            raise CsvReadError(_one_line(str(exc), csv, s.path)) from None
    return rows


def _publish(kind: FileKind, staging: Path, out: Path) -> None:
    """Move the staged files of ``kind`` into the dataset, file by file (each whole)."""
    target = staging / kind.name
    for part in sorted(target.rglob("*.parquet")):
        dest = out / kind.name / part.relative_to(target)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(part, dest)
    shutil.rmtree(target, ignore_errors=True)


def _one_line(message: str, read: Path, source: Path) -> str:
    text = re.sub(r"^[A-Za-z ]*Error: ", "", message.split("\n", 1)[0])
    text = text.replace(str(read), str(source))
    return text if text.startswith(str(source)) else f"{source}: {text}"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _checked(col: str, sql_type: str) -> str:
    """A cell cast to its type, or an error naming the file and the bad text."""
    c = f"r.{_ident(col)}"
    if sql_type == "DOUBLE":
        return duck._checked_double(c)
    if sql_type in ("BIGINT", "INTEGER"):
        return f"CAST({duck._checked_int(c)} AS {sql_type})"
    if sql_type == "BOOLEAN":
        return (
            f"CASE WHEN {c} IS NULL THEN NULL WHEN {c} IN ('0', '1') THEN {c} = '1' "
            f"ELSE error(filename || ': bad flag ' || {c}) END"
        )
    if sql_type == TIMESTAMP:
        return (
            f"CASE WHEN {c} IS NULL THEN NULL WHEN try_cast({c} AS TIMESTAMPTZ) IS NULL "
            f"THEN error(filename || ': bad timestamp ' || {c}) ELSE CAST({c} AS TIMESTAMPTZ) END"
        )
    return c
