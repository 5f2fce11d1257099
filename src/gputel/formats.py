"""The small rules every gputel file and message follows, each written once.

- Timestamps: ISO 8601 UTC with milliseconds (``2026-11-22T03:45:12.000Z``) in every CSV and
  JSON file, and the parser that reads them back.
- CSV cells: an empty cell for a missing value, a float at its field's precision (fixed
  decimals from the schema table; ``repr``, which round-trips exactly, where no precision is
  given), integers exact, 1/0 for flags, quotes only where needed, and one physical line per
  row (a line break inside a value becomes a space, so ``grep``/``tail`` never see half a row).
  Text that a spreadsheet would run as a formula (a leading ``= + - @``, tab or CR) gets a
  leading ``'`` (OWASP's advice), as does text that already starts with one, so dropping a
  leading ``'`` always gives the original back (:func:`safe_text`, :func:`original_text`).
- Whole-row appends: a row goes out in ONE ``write`` on an ``O_APPEND`` descriptor; a short
  write (disk full) is truncated back to the last whole row, so a later write never follows half
  a row. Failures are counted, logged once when they start and once when they stop. A file whose
  header is not this version's (written by an older one) is moved aside to
  ``<name>-pre-<UTC stamp>.csv`` before the first row and a new file is started: rows are never
  appended under another header.
- Atomic replace: readers of a state file see the old or the new content, never a mix.
- An exception as one line, for logs and control replies.
- Whether a process is alive (zombies and reused pids count as dead).

Import-light on purpose: the CLI, the agent and the recorder all load it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import math
import os
import re
import tempfile
import time
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
        if utc:
            # A tick formats the same moments many times (its rows, its open jobs' starts).
            return _iso_utc_ms_of(moment)
        dt = moment.astimezone(timezone.utc)
    else:
        dt = datetime.fromtimestamp(moment, timezone.utc)
    return _iso_text(dt)


def _iso_text(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@functools.lru_cache(maxsize=256)
def _iso_utc_ms_of(dt: datetime) -> str:
    """``_iso_text`` of a UTC (or naive) datetime, remembered: equal datetimes give equal text."""
    return _iso_text(dt)


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


#: What a view for people shows for a value it does not have (never 0, which would be a reading;
#: never a blank, which reads as a missing column). CSV cells stay empty (:func:`csv_cell`).
UNKNOWN = "–"


def human_number(value: object, digits: int = 1, unit: str = "") -> str:
    """``value`` with ``digits`` decimals and ``unit`` for people; :data:`UNKNOWN` when it is
    not a number (None, a flag, text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return UNKNOWN
    return f"{value:.{digits}f}{unit}"


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

#: First characters a spreadsheet reads as a formula (or, tab and CR, skips before one).
FORMULA_START = frozenset("=+-@\t\r")
_NEUTRALISED = FORMULA_START | {"'"}
#: A plain signed decimal is a number, not a formula: it stays as it is (a summary's figures
#: arrive here as text).
_PLAIN_NUMBER = re.compile(r"[-+]?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")


def safe_text(text: str) -> str:
    """``text`` as a CSV cell may hold it: a leading ``'`` added where a spreadsheet would read
    a formula, and where the text already starts with ``'`` (so the rule reverses exactly).

    Every text cell goes through it (:func:`csv_cell`): ids, commands, user and job names,
    event details, reasons. A plain number (``-3.5``) is no formula and stays as it is.
    """
    if text and text[0] in _NEUTRALISED and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text


def original_text(cell: str) -> str:
    """A text cell read back: the value before :func:`safe_text` (a leading ``'`` dropped)."""
    return cell[1:] if cell.startswith("'") else cell


#: ``format`` specs by number of decimals, built once (a tick formats hundreds of cells).
_FIXED = tuple(f".{d}f" for d in range(10))


def csv_cell(value: object, decimals: int | None = None) -> str:
    """One CSV cell: None → empty, float → ``decimals`` fixed decimals (``repr`` when None),
    int → exact, bool → 1/0, text through :func:`safe_text` and quoted only if needed.

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
    text = safe_text(str(value))
    if _SPECIAL.search(text) is None:
        return text
    one_row = text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")
    return '"' + one_row.replace('"', '""') + '"'


_UNSET = object()
_REUSABLE = frozenset({float, int, str, bool})


class RepeatCells:
    """The cells of one row that is written every tick (a GPU's), each column's text reused
    while its value repeats: most of a GPU's values (totals, limits, clocks, counters, flags)
    change seldom, and formatting is most of what a row costs.

    A value is the same only when it is an equal number, text or flag of the same type (``1``
    and ``1.0`` are equal yet written differently); a float zero only in a column with fixed
    decimals, where ``0.0`` and ``-0.0`` are written alike (``repr`` keeps the sign). Anything
    else goes through :func:`csv_cell` again, so the text is always what ``csv_cell`` gives.
    Zeros are common (error counters, throttle reasons, idle engines), so they are reused too.
    """

    __slots__ = ("_decimals", "_signed_zero", "_texts", "_values")

    def __init__(self, decimals: Iterable[int | None]) -> None:
        self._decimals = tuple(decimals)
        self._signed_zero = tuple(d is None for d in self._decimals)
        """Per column: whether a float zero's sign shows (``repr``), so zero is not reused."""
        self._values: list[object] = [_UNSET] * len(self._decimals)
        self._texts = [""] * len(self._decimals)

    def cells(self, values: Iterable[object]) -> list[str]:
        """The cells of ``values`` (one per column, in the order of ``decimals``)."""
        out: list[str] = []
        append = out.append
        last_values, texts, decimals = self._values, self._texts, self._decimals
        signed_zero = self._signed_zero
        reusable = _REUSABLE
        for i, value in enumerate(values):
            last = last_values[i]
            cls = value.__class__
            if cls is last.__class__ and (
                value is None
                or (
                    cls in reusable
                    and value == last
                    and (value or cls is not float or not signed_zero[i])
                )
            ):
                append(texts[i])
                continue
            text = texts[i] = csv_cell(value, decimals[i])
            last_values[i] = value
            append(text)
        return out


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
    one with a ``%s`` (where) and a ``%d`` (rows lost in total). ``since`` (epoch seconds) and
    ``error`` describe the current failure for ``gputel status`` (:meth:`status`).
    """

    def __init__(self, logger: logging.Logger, failing: str, recovered: str) -> None:
        self._log = logger
        self._failing_msg = failing
        self._recovered_msg = recovered
        self.rows_failed = 0
        self.failing = False
        self.since: float | None = None
        """When the current failure began (None while writing works)."""
        self.error: str | None = None
        """The latest failure's reason (kept after recovery: what went wrong last)."""

    def failed(self, rows: int, detail: str) -> None:
        self.rows_failed += rows
        self.error = detail
        if not self.failing:
            self.failing = True
            self.since = time.time()
            self._log.error(self._failing_msg, detail)

    def succeeded(self, where: object) -> None:
        if self.failing:
            self.failing = False
            self.since = None
            self._log.warning(self._recovered_msg, where, self.rows_failed)

    def status(self, file: str) -> dict[str, object] | None:
        """``{"file", "failing", "since", "rows_failed", "error"}`` once a row was lost; None
        while none was (nothing to say)."""
        if not self.rows_failed and not self.failing:
            return None
        return {
            "file": file,
            "failing": self.failing,
            "since": None if self.since is None else iso_utc_ms(self.since),
            "rows_failed": self.rows_failed,
            "error": self.error,
        }


_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
#: The longest header line read back to compare with this version's.
_HEADER_READ = 64 * 1024
#: How many older-layout files of one name may be moved aside within one second.
_ASIDE_SUFFIXES = 1000


def moved_aside_name(path: Path, now: float | None = None) -> Path:
    """A free name for an older-layout ``path`` (``events.csv`` →
    ``events-pre-20261207T024700Z.csv``, then ``_001``…): the logrotate policy's
    ``*-pre-*.csv`` globs and the analysis commands' ``events-*.csv`` match it."""
    stamp = datetime.fromtimestamp(time.time() if now is None else now, timezone.utc)
    base = f"{path.stem}-pre-{stamp.strftime('%Y%m%dT%H%M%SZ')}"
    for n in range(_ASIDE_SUFFIXES):
        candidate = path.with_name(f"{base}.csv" if n == 0 else f"{base}_{n:03d}.csv")
        if not os.path.lexists(candidate):
            return candidate
    raise OSError(errno.EEXIST, f"no free name to move {path.name} aside")


def _first_line(fd: int) -> bytes:
    head = os.pread(fd, _HEADER_READ, 0)
    end = head.find(b"\n")
    return head[: end + 1] if end >= 0 else head


class RowAppender:
    """Appends whole rows to one CSV file, writing the header first when the file is new.

    The file is opened per row, so logrotate may move it at any time: the next row starts a new
    file with its header. A file with another header (an older version's layout) is moved aside
    first and never appended to. A failure costs that row only; nothing here raises.
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
        self._log = logger
        self._checked: tuple[int, int] | None = None
        """(device, inode) of the last file whose header was found to be this version's."""
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
            for _ in range(3):
                # Never through a symlink: an agent running as root must not append to whatever
                # file someone pointed transitions.csv at.
                fd = os.open(self.path, _APPEND_FLAGS, 0o640)
                try:
                    # Decide on the header from the file actually opened: logrotate may have
                    # moved the old one away an instant ago.
                    st = os.fstat(fd)
                    known = (st.st_dev, st.st_ino) == self._checked
                    if st.st_size and not known and not self._header_is_ours(fd, st):
                        continue  # moved aside (by this or another writer): open anew
                    write_whole(fd, row if st.st_size else self.header + row, st.st_size)
                    if not st.st_size:
                        self._checked = (st.st_dev, st.st_ino)
                    break
                finally:
                    os.close(fd)
            else:
                raise OSError(errno.EAGAIN, "the file kept changing under the writer")
        except OSError as exc:
            self.failures.failed(1, f"{self.path} ({exc.strerror or exc})")
            return False
        self.failures.succeeded(self.path)
        return True

    def _header_is_ours(self, fd: int, st: os.stat_result) -> bool:
        """Whether the open file has this version's header; if not, move it aside.

        Writers of the same file (the agent and the recorder both append to allocations.csv)
        decide under an exclusive lock on the old file, and rename only while the name still
        names that file: the loser of a race sees a name that moved on and simply reopens.
        """
        if _first_line(fd) == self.header:
            self._checked = (st.st_dev, st.st_ino)
            return True
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            try:
                now = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                return False
            if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                return False
            aside = moved_aside_name(self.path)
            # link + unlink, not rename: rename would replace a file that appeared at the
            # aside name in the meantime.
            os.link(self.path, aside, follow_symlinks=False)
            os.unlink(self.path)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        self._log.warning(
            "%s was written by another version (other columns); moved it aside to %s "
            "and started a new file",
            self.path,
            aside.name,
        )
        return False


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
#: A start time is derived from the boot time and clock ticks (:func:`_start_time`); two reads of
#: the same process agree far better than this, while a reused pid almost never starts within it.
START_TIME_TOLERANCE_S = 1.0


def _proc_stat(pid: int) -> list[bytes]:
    """The fields of ``/proc/<pid>/stat`` after the command name, the state first (OSError when
    the process is gone or unreadable)."""
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return fh.read().rsplit(b")", 1)[-1].split()


def _start_time(fields: list[bytes]) -> float | None:
    """Epoch seconds the process started, psutil's formula: the boot time (``btime`` of
    ``/proc/stat``) plus its start in clock ticks since boot (field 22 of its stat)."""
    try:
        ticks = int(fields[19])
        with open("/proc/stat", "rb") as fh:
            for line in fh:
                if line.startswith(b"btime"):
                    return float(line.split()[1]) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None
    return None


def process_start_time(pid: int) -> float | None:
    """The process's creation time (epoch seconds), or None when unknown or gone: what
    :func:`process_alive` compares against a reused pid.

    Read from procfs rather than through psutil, whose import (about 20 ms and 4 MiB) the
    recorder child would otherwise pay at every start just to check its agent.
    """
    try:
        return _start_time(_proc_stat(pid))
    except OSError:
        return None


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
        fields = _proc_stat(pid)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # unreadable: it exists, and nothing says it is another process
    if fields[:1] == [b"Z"]:
        return False
    if start_time is None:
        return True
    started = _start_time(fields)
    return started is None or abs(started - start_time) <= START_TIME_TOLERANCE_S
