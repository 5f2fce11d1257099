"""The pure-Python CSV reader of earlier versions, kept only as the benchmark's baseline.

Analysis must stay flat in memory for a week of 8-GPU data, so nothing here loads a whole file:
rows are yielded one at a time as plain tuples with a column index. Files are found in the log
directory or given paths, including what logrotate leaves behind (``.csv.1``, ``.csv.2.gz``).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

_NAME_RE = re.compile(r"^(gpu|host)-.*\.csv(\.\d+)?(\.gz)?$")


class CsvReadError(ValueError):
    """A file that is not a gputel CSV of the expected kind."""


def csv_kind(path: Path) -> str | None:
    """``"gpu"`` or ``"host"`` from a file name, or None for other files."""
    m = _NAME_RE.match(path.name)
    return m.group(1) if m else None


def find_csv_files(paths: Iterable[Path], kind: str) -> list[Path]:
    """Every ``kind`` CSV under ``paths`` (directories are searched, files taken as given)."""
    found: set[Path] = set()
    for p in paths:
        if p.is_dir():
            found.update(f for f in p.iterdir() if f.is_file() and csv_kind(f) == kind)
        elif p.is_file() and csv_kind(p) == kind:
            found.add(p)
        elif not p.exists():
            raise CsvReadError(f"{p}: no such file or directory")
    return sorted(found)


def open_text(path: Path) -> io.TextIOBase:
    """Open plain or gzip-compressed text (by magic bytes, not by name)."""
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


_DAY_CACHE: dict[str, float] = {}


def parse_timestamp(text: str) -> float:
    """Seconds since the epoch from ``2026-11-22T03:45:12.345Z`` (fast path, cached per day)."""
    day = text[:10]
    base = _DAY_CACHE.get(day)
    try:
        if base is None:
            base = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=timezone.utc).timestamp()
            _DAY_CACHE[day] = base
        if text[10] != "T" or not text.endswith("Z"):
            raise ValueError
        return base + int(text[11:13]) * 3600 + int(text[14:16]) * 60 + float(text[17:-1])
    except (ValueError, IndexError):
        raise CsvReadError(f"bad timestamp {text!r}") from None


@dataclass
class CsvFile:
    """An open gputel CSV: its column indexes and a row iterator."""

    path: Path
    columns: dict[str, int]
    rows: Iterator[list[str]]


def read_csv(path: Path, required: Iterable[str] = ("timestamp",)) -> Iterator[CsvFile]:
    """Yield one :class:`CsvFile` for ``path`` (a generator so the file closes when done)."""
    with open_text(path) as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        columns = {name: i for i, name in enumerate(header)}
        missing = [c for c in required if c not in columns]
        if missing:
            raise CsvReadError(f"{path}: not a gputel CSV (missing columns {', '.join(missing)})")
        width = len(header)
        yield CsvFile(path, columns, (row for row in reader if len(row) == width))


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Turn any decode or parse failure inside into one CsvReadError that names the file."""
    try:
        yield
    except CsvReadError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise CsvReadError(f"{path}: {exc}") from None
    except (UnicodeDecodeError, csv.Error, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise CsvReadError(f"{path}: unreadable ({exc.__class__.__name__}: {exc})") from None


@dataclass(frozen=True)
class ReportFilter:
    """Which rows an analysis looks at: a time range, GPU indices, one allocation."""

    since: float | None = None
    until: float | None = None
    gpus: frozenset[int] | None = None
    allocation: str | None = None

    def keeps_time(self, ts: float) -> bool:
        return (self.since is None or ts >= self.since) and (self.until is None or ts <= self.until)


#: Columns without which a file is not a gputel GPU CSV.
GPU_REQUIRED = ("timestamp", "gpu", "utilization_gpu_pct")


def gpu_rows(f: CsvFile, flt: ReportFilter) -> Iterator[tuple[float, int, list[str]]]:
    """The rows of a GPU file that ``flt`` keeps, with timestamp and GPU index parsed."""
    i_ts, i_gpu = f.columns["timestamp"], f.columns["gpu"]
    keeps_time, gpus = flt.keeps_time, flt.gpus
    for row in f.rows:
        ts = parse_timestamp(row[i_ts])
        if not keeps_time(ts):
            continue
        cell = row[i_gpu]
        if not (cell.isascii() and cell.isdigit()):
            raise CsvReadError(f"bad GPU index {cell!r}")
        gpu = int(cell)
        if gpus is not None and gpu not in gpus:
            continue
        yield ts, gpu, row


def first_timestamp(path: Path) -> float | None:
    """Timestamp of the first data row (orders files from different sessions and hosts)."""
    with naming(path):
        for f in read_csv(path):
            for row in f.rows:
                return parse_timestamp(row[f.columns["timestamp"]])
    return None


def as_float(text: str) -> float | None:
    """A cell as float; the empty cell (no value) is None."""
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise CsvReadError(f"bad number {text!r}") from None
