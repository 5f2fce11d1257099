"""The shared file rules: timestamps, CSV cells, whole-row appends, atomic replace, one-line
errors and process liveness."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gputel import formats
from gputel.formats import (
    RowAppender,
    TornWrite,
    atomic_write_bytes,
    atomic_write_fixed_tmp,
    csv_cell,
    csv_row,
    error_line,
    finite,
    iso_utc_ms,
    one_line,
    parse_iso_utc,
    process_alive,
    write_whole,
)

T0 = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)


def test_timestamp_forms_and_round_trip() -> None:
    assert iso_utc_ms(T0) == "2026-11-22T03:45:12.000Z"
    assert iso_utc_ms(T0 + timedelta(microseconds=123999)) == "2026-11-22T03:45:12.123Z"
    assert iso_utc_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc_ms(1.2345) == "1970-01-01T00:00:01.234Z"
    plus_two = T0.astimezone(timezone(timedelta(hours=2)))
    assert iso_utc_ms(plus_two) == "2026-11-22T03:45:12.000Z"
    moment = T0 + timedelta(milliseconds=789)
    assert parse_iso_utc(iso_utc_ms(moment)) == moment
    assert parse_iso_utc("2026-11-22T03:45:12") == T0  # naive means UTC
    assert parse_iso_utc("2026-11-22T05:45:12+02:00") == T0
    with pytest.raises(ValueError):
        parse_iso_utc("yesterday")


def test_now_is_now() -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    assert before <= parse_iso_utc(iso_utc_ms()) <= before + timedelta(seconds=60)


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        (None, ""),
        (1.5, "1.5"),
        (0.1 + 0.2, repr(0.1 + 0.2)),
        (3, "3"),
        (True, "1"),
        (False, "0"),
        ("plain", "plain"),
        ("a,b", '"a,b"'),
        ('say "hi"', '"say ""hi"""'),
        ("two\nlines\r\nhere", '"two lines here"'),
    ],
)
def test_csv_cell(value: object, cell: str) -> None:
    assert csv_cell(value) == cell


@pytest.mark.parametrize(
    ("value", "decimals", "cell"),
    [
        (412.79296875, 0, "413"),
        (0.69287109375, 2, "0.69"),
        (41.5, 2, "41.50"),
        (1234.5678919, 3, "1234.568"),
        (-3.25, 1, "-3.2"),
        (-0.004, 2, "0.00"),
        (-0.0, 0, "0"),
        (None, 2, ""),
        # Integers stay exact: a 64-bit counter formatted through a float would lose digits.
        (2**63 + 1, 0, str(2**63 + 1)),
        (7, 2, "7"),
        (True, 2, "1"),
        ("text", 2, "text"),
    ],
)
def test_csv_cell_at_a_precision(value: object, decimals: int, cell: str) -> None:
    assert csv_cell(value, decimals) == cell


def test_csv_row_reads_back_with_the_csv_module() -> None:
    values = ["id,1", 'q"uote', None, 2.25, "x\ny"]
    text = csv_row(values)
    assert text.endswith("\n") and text.count("\n") == 1
    assert next(csv.reader(io.StringIO(text))) == ["id,1", 'q"uote', "", "2.25", "x y"]


def test_finite() -> None:
    assert finite(2) == 2.0 and finite(1.5) == 1.5
    assert finite(True) is None and finite("1") is None
    assert finite(float("nan")) is None and finite(float("inf")) is None


def test_row_appender_writes_the_header_once_and_again_after_rotation(tmp_path: Path) -> None:
    rows = RowAppender(tmp_path / "x.csv", ("a", "b"), logging.getLogger("t"))
    assert rows.append([1, "two, three"])
    assert rows.append([None, 4.0])
    assert (tmp_path / "x.csv").read_text() == 'a,b\n1,"two, three"\n,4.0\n'
    os.rename(tmp_path / "x.csv", tmp_path / "x.csv.1")  # logrotate moves it away
    assert rows.append([5, 6])
    assert (tmp_path / "x.csv").read_text() == "a,b\n5,6\n"


def test_row_appender_failure_counted_logged_once_and_recovery_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "missing" / "x.csv"
    rows = RowAppender(path, ("a",), logging.getLogger("t"))
    with caplog.at_level(logging.WARNING):
        assert not rows.append([1])
        assert not rows.append([2])
        path.parent.mkdir()
        assert rows.append([3])
        assert rows.append([4])
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot write" in m for m in messages) == 1
    assert sum("works again (2 rows lost" in m for m in messages) == 1
    assert rows.rows_failed == 2
    assert path.read_text() == "a\n3\n4\n"
    made = RowAppender(tmp_path / "new" / "y.csv", ("a",), logging.getLogger("t"), make_dir=True)
    assert made.append([1]) and (tmp_path / "new" / "y.csv").exists()


def test_row_appender_never_writes_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep\n")
    (tmp_path / "x.csv").symlink_to(target)
    rows = RowAppender(tmp_path / "x.csv", ("a",), logging.getLogger("t"))
    assert not rows.append([1]) and rows.rows_failed == 1
    assert target.read_text() == "keep\n"


class _ShortFd:
    """Stands in for ``os.write``/``os.ftruncate`` on one real descriptor: the disk "fills"
    after ``room`` bytes, as a full filesystem does."""

    def __init__(self, fd: int, room: int, truncate_fails: bool = False) -> None:
        self.fd = fd
        self.room = room
        self.truncate_fails = truncate_fails
        self.real_write = os.write
        self.real_truncate = os.ftruncate

    def write(self, fd: int, data: bytes) -> int:
        assert fd == self.fd
        if self.room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.real_write(fd, bytes(data[: self.room]))
        self.room -= n
        return n

    def ftruncate(self, fd: int, size: int) -> None:
        if self.truncate_fails:
            raise OSError(errno.EIO, "Input/output error")
        self.real_truncate(fd, size)


def test_short_write_is_cut_back_to_the_last_whole_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.csv"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        write_whole(fd, b"h\n1\n", 0)
        fake = _ShortFd(fd, room=3)
        monkeypatch.setattr(formats.os, "write", fake.write)
        monkeypatch.setattr(formats.os, "ftruncate", fake.ftruncate)
        with pytest.raises(OSError) as short:
            write_whole(fd, b"22222\n", 4)  # only "222" fits
        assert short.value.errno == errno.ENOSPC
        assert path.read_bytes() == b"h\n1\n"
        with pytest.raises(OSError):
            write_whole(fd, b"3\n", 4)  # the disk is still full
        assert path.read_bytes() == b"h\n1\n"
        fake.room = 100  # space returns: the next row follows a whole one
        write_whole(fd, b"4\n", 4)
        assert path.read_bytes() == b"h\n1\n4\n"
        fake.room, fake.truncate_fails = 1, True
        with pytest.raises(TornWrite):
            write_whole(fd, b"55\n", 6)
    finally:
        os.close(fd)


def test_atomic_writes_replace_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    atomic_write_bytes(path, b"one")
    atomic_write_bytes(path, b"two", mode=0o600)
    assert path.read_bytes() == b"two"
    assert path.stat().st_mode & 0o777 == 0o600
    atomic_write_fixed_tmp(path, b"three" * 1000)
    assert path.read_bytes() == b"three" * 1000
    assert path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
    with pytest.raises(OSError):
        atomic_write_bytes(tmp_path / "missing" / "x", b"")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_one_line() -> None:
    assert one_line(ValueError("bad\n  thing\there")) == "bad thing here"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("") == "error"


def test_error_line_names_the_type_on_one_line() -> None:
    assert error_line(RuntimeError("driver\n  wedged")) == "RuntimeError: driver wedged"
    assert error_line(KeyError()) == "KeyError"


def test_process_alive() -> None:
    assert process_alive(os.getpid())
    me = __import__("psutil").Process().create_time()
    assert process_alive(os.getpid(), me)
    assert not process_alive(os.getpid(), me - 3600)  # a reused pid: another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not process_alive(child.pid)  # reaped: gone
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert not process_alive(zombie.pid)
    finally:
        zombie.wait()
    assert process_alive(1)  # not ours to signal, still alive


def test_repeat_cells_write_what_csv_cell_writes_tick_after_tick() -> None:
    """Reused cells never differ from a fresh ``csv_cell``: zero's sign, int against float
    against bool, NaN, None and text all change the cell when they change."""
    decimals = (None, 2, None, 1)
    ticks = [
        (0.0, 1.5, 1, "a"),
        (-0.0, 1.5, 1.0, "a"),
        (-0.0, -0.001, True, "=x"),
        (0.0, float("nan"), True, "=x"),
        (None, float("nan"), 1, None),
        (2.5, 1.5, 0, "a,b"),
        (2.5, 1.5, False, "a,b"),
        (2.5, 1.5, 0, "a,b"),
        # Zeros are reused: an int zero, a fixed-decimals float zero of either sign, "".
        (0.0, 0.0, 0, ""),
        (-0.0, -0.0, 0, ""),
        (-0.0, 0.0, 0, ""),
        (0.0, -0.0, False, ""),
        (0.0, 0.0, False, ""),
    ]
    repeat = formats.RepeatCells(decimals)
    for values in ticks:
        assert repeat.cells(values) == [
            formats.csv_cell(v, d) for v, d in zip(values, decimals, strict=True)
        ]


def test_process_start_time_agrees_with_psutil_for_owners_recorded_before() -> None:
    # allocations.json of earlier versions holds psutil's create_time: the same process must
    # still compare equal, and so count as alive.
    import psutil

    for pid in (1, os.getpid(), os.getppid()):
        ours = formats.process_start_time(pid)
        assert ours is not None
        assert abs(ours - psutil.Process(pid).create_time()) < 0.05
        assert formats.process_alive(pid, psutil.Process(pid).create_time())
    assert not formats.process_alive(os.getpid(), psutil.Process(os.getpid()).create_time() - 60)


def test_checking_a_parent_by_start_time_does_not_load_psutil() -> None:
    # The recorder child checks its agent this way at every start.
    code = (
        "import os, sys\n"
        "from gputel.lineage import agent_of_child, parent_is\n"
        "assert parent_is(agent_of_child({}))\n"
        "assert 'psutil' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_human_numbers_mark_what_is_not_known_one_way() -> None:
    assert formats.human_number(1.234, 1, " s") == "1.2 s"
    assert formats.human_number(3, 0, " J") == "3 J"
    assert formats.human_number(0.0, 2) == "0.00"  # a reading of zero stays a zero
    for unknown in (None, True, "12"):
        assert formats.human_number(unknown) == formats.UNKNOWN == "–"
    # No view for people spells it another way (it was "n/a" in some, blank in others).
    src = Path(formats.__file__).parent
    spelled = [
        f"{p.relative_to(src)}:{n}"
        for p in sorted(src.rglob("*.py"))
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "n/a" in line
    ]
    assert spelled == []
