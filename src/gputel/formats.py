"""The small rules every gputel file and message follows, each written once.

- Timestamps: ISO 8601 UTC with milliseconds (``2026-11-22T03:45:12.000Z``) in every CSV and
  JSON file, and the parser that reads them back.
- CSV cells: an empty cell for a missing value, a float at its field's precision (fixed
  decimals from the schema table; ``repr``, which round-trips exactly, where no precision is
  given), integers exact, 1/0 for flags, quotes only where needed, and one physical line per
  row (a line break inside a value becomes a space, so ``grep``/``tail`` never see half a row).
- Whole-row appends: a row goes out in ONE ``write`` on an ``O_APPEND`` descriptor; a short
  write (disk full) is truncated back to the last whole row, so a later write never follows half
  a row. Failures are counted, logged once when they start and once when they stop.
- Atomic replace: readers of a state file see the old or the new content, never a mix.
- An exception as one line, for logs and control replies.
- Whether a process is alive (zombies and reused pids count as dead).

Import-light on purpose: the CLI, the agent and the recorder all load it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path

# ---------------------------------------------------------------------------------- timestamps


def iso_utc_ms(moment: datetime | float | None = None) -> str:
    """ISO 8601 UTC with milliseconds; ``moment`` is a datetime, epoch seconds, or now."""
    if moment is None:
        dt = datetime.now(timezone.utc)
    elif isinstance(moment, datetime):
        utc = moment.tzinfo is None or moment.tzinfo is timezone.utc  # every tick: skip the call
        dt = moment if utc else moment.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(moment, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def parse_iso_utc(text: str) -> datetime:
    """An aware UTC datetime from :func:`iso_utc_ms` output (or any ISO form; naive means UTC).

    Raises ValueError for text that is not a timestamp.
    """
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def display_time(moment: object) -> str | None:
    """A timestamp as every command prints it: ISO 8601 UTC with milliseconds.

    ``moment`` is ISO text in any offset (a status or reply field) or epoch seconds; text that is
    not a time is returned as it is, nothing (None, empty) is None.
    """
    if moment is None or moment == "" or isinstance(moment, bool):
        return None
    if isinstance(moment, (int, float)):
        try:
            return iso_utc_ms(float(moment))
        except (OverflowError, ValueError, OSError):
            return str(moment)
    if not isinstance(moment, str):
        return None
    try:
        return iso_utc_ms(parse_iso_utc(moment))
    except ValueError:
        return moment


def finite(value: object) -> float | None:
    """``value`` as a float if it is a finite number (read from JSON, say), else None.

    ``True``/``False`` are not numbers here.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


# ---------------------------------------------------------------------------------- CSV cells
_SPECIAL = re.compile(r'[,"\r\n]')


#: ``format`` specs by number of decimals, built once (a tick formats hundreds of cells).
_FIXED = tuple(f".{d}f" for d in range(10))


def csv_cell(value: object, decimals: int | None = None) -> str:
    """One CSV cell: None → empty, float → ``decimals`` fixed decimals (``repr`` when None),
    int → exact, bool → 1/0, text quoted only if needed.

    Integers are never formatted as floats: a 64-bit byte counter would lose its low digits.
    """
    if value is None:
        return ""
    cls = value.__class__
    if cls is float:
        if decimals is None:
            return repr(value)
        text = format(value, _FIXED[decimals])
        if text[0] == "-" and not text.strip("-0."):
            return text[1:]  # -0.004 at 0.01 is "0.00": a sign on zero is noise
        return text
    if cls is int:
        return str(value)
    if value is True:
        return "1"
    if value is False:
        return "0"
    text = str(value)
    if _SPECIAL.search(text) is None:
        return text
    one_row = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return '"' + one_row.replace('"', '""') + '"'


def csv_row(values: Iterable[object]) -> str:
    """A whole CSV row, ending in ``\\n``."""
    return ",".join(csv_cell(v) for v in values) + "\n"


# ---------------------------------------------------------------------------------- appends
class TornWrite(OSError):
    """A write failed AND its partial tail could not be cut off: abandon the file."""


def write_whole(fd: int, data: bytes, good_size: int) -> None:
    """Append ``data`` in one ``os.write``; on failure leave the file at ``good_size`` bytes.

    ``fd`` is opened with ``O_APPEND`` and ``good_size`` is its length before this write. A
    short write is reported as ENOSPC. Raises :class:`TornWrite` when even the truncation fails.
    """
    try:
        n = os.write(fd, data)
    except OSError:
        _cut(fd, good_size)
        raise
    if n != len(data):
        _cut(fd, good_size)
        raise OSError(errno.ENOSPC, "short write")


def _cut(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        raise TornWrite(
            exc.errno or errno.EIO, f"cannot cut a partial row: {exc.strerror}"
        ) from exc


class FailureCounter:
    """Counts rows that could not be written; logs when failing starts and when it stops.

    ``failing`` is a ``%``-style message with one ``%s`` (where it fails and why); ``recovered``
    one with a ``%s`` (where) and a ``%d`` (rows lost in total).
    """

    def __init__(self, logger: logging.Logger, failing: str, recovered: str) -> None:
        self._log = logger
        self._failing_msg = failing
        self._recovered_msg = recovered
        self.rows_failed = 0
        self.failing = False

    def failed(self, rows: int, detail: str) -> None:
        self.rows_failed += rows
        if not self.failing:
            self.failing = True
            self._log.error(self._failing_msg, detail)

    def succeeded(self, where: object) -> None:
        if self.failing:
            self.failing = False
            self._log.warning(self._recovered_msg, where, self.rows_failed)


_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW


class RowAppender:
    """Appends whole rows to one CSV file, writing the header first when the file is new.

    The file is opened per row, so logrotate may move it at any time: the next row starts a new
    file with its header. A failure costs that row only; nothing here raises.
    """

    def __init__(
        self,
        path: Path,
        header: Iterable[str],
        logger: logging.Logger,
        *,
        make_dir: bool = False,
    ) -> None:
        self.path = Path(path)
        self.make_dir = make_dir
        """Create the missing directory (else a missing one is a failure like any other)."""
        self.header = csv_row(header).encode()
        self.failures = FailureCounter(
            logger,
            "cannot write %s; rows are being lost until it works again "
            "(check GPUTEL_LOG_DIR exists and is writable)",
            "writing %s works again (%d rows lost in total)",
        )

    @property
    def rows_failed(self) -> int:
        return self.failures.rows_failed

    def append(self, values: Iterable[object]) -> bool:
        """Write one row; False when it could not be written (already counted and logged)."""
        row = csv_row(values).encode()
        try:
            if self.make_dir:
                with contextlib.suppress(FileExistsError):
                    self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # Never through a symlink: an agent running as root must not append to whatever
            # file someone pointed transitions.csv at.
            fd = os.open(self.path, _APPEND_FLAGS, 0o640)
            try:
                # Decide on the header from the file actually opened: logrotate may have moved
                # the old one away an instant ago.
                size = os.fstat(fd).st_size
                write_whole(fd, row if size else self.header + row, size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.failures.failed(1, f"{self.path} ({exc.strerror or exc})")
            return False
        self.failures.succeeded(self.path)
        return True


# ---------------------------------------------------------------------------------- replace
def atomic_write_bytes(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` so readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    replace_via(fd, tmp, path, data, mode)


_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW


def atomic_write_fixed_tmp(path: Path, data: bytes, mode: int = 0o640) -> None:
    """:func:`atomic_write_bytes` through the fixed temporary name ``.<name>.tmp``.

    Only for a file with a single writer that rewrites it often (the recorder, every tick): it
    skips ``mkstemp``'s name search.
    """
    tmp = f"{path.parent}/.{path.name}.tmp"
    # The mode is given at creation; the file is only ever truncated and renamed after that.
    replace_via(os.open(tmp, _TMP_FLAGS, mode), tmp, path, data, None)


def replace_via(fd: int, tmp: str, path: Path, data: bytes, mode: int | None) -> None:
    """Write ``data`` to the open temporary ``fd`` (at ``tmp``), set ``mode`` unless None, then
    rename it over ``path``."""
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if mode is not None:
                os.fchmod(fd, mode)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------- messages
def one_line(error: object) -> str:
    """An exception (or any text) as one line: whitespace runs collapsed, never empty."""
    text = " ".join(str(error).split())
    if text:
        return text
    return type(error).__name__ if isinstance(error, BaseException) else "error"


def error_line(exc: BaseException) -> str:
    """An unexpected exception as one line with its type (``ValueError: bad``), for logs and
    replies where the type is the only clue; the type alone when it has no message."""
    kind = type(exc).__name__
    text = one_line(exc)
    return kind if text == kind else f"{kind}: {text}"


# ---------------------------------------------------------------------------------- processes
#: psutil derives a process's start time from boot time and clock ticks; two reads of the same
#: process agree far better than this, while a reused pid almost never starts within it.
START_TIME_TOLERANCE_S = 1.0


def process_alive(pid: int, start_time: float | None = None) -> bool:
    """Whether ``pid`` runs, is not a zombie and (when ``start_time`` is given) is that process.

    A pid we may not signal (another user's process) counts as alive; only "no such process", a
    zombie, or a different start time (the pid was reused) counts as dead.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            if fh.read().rsplit(b")", 1)[-1].split()[0] == b"Z":
                return False
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    if start_time is None:
        return True
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - start_time) <= START_TIME_TOLERANCE_S
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True
