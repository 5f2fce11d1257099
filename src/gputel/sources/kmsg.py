"""The kernel log, followed on a thread of its own for the driver's Xid and SXid lines.

``GPUTEL_KMSG`` names what is read (empty: nothing):

- a character device (``/dev/kmsg``, the default): opened non-blocking and moved to its end
  (``SEEK_END``), so only records written after the agent started are read. Each ``read()``
  returns one whole record (``prio,seq,usec,flags;message``); ``EAGAIN`` waits in ``poll()``,
  ``EPIPE`` means the kernel overwrote records before they were read (said once in the log,
  reading goes on with the next one);
- any other file (a log that a syslog daemon writes, a test's file): read from its end at start,
  then followed as it grows. A file that shrinks (truncated) is read again from its start; one
  replaced under its name (rotated) is read to its end, then the new one from its start; a file
  that does not exist yet is read from its start once it appears.

Reading needs nothing from NVML: a wedged driver or a GPU off the bus is exactly when these
lines matter. The thread is a daemon that nobody joins; its waits are short, so it ends soon
after :meth:`KmsgReader.stop`. A log that cannot be read is one notice (log and ``gputel
status``), never a failure.
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
from collections.abc import Callable

from gputel.formats import one_line
from gputel.sources.kernel_xid import KernelFault, parse_line, record_message
from gputel.sources.notice import StandingNotice

log = logging.getLogger("gputel.kmsg")

#: Seconds between looks at a followed file (and the longest a stop request waits).
POLL_S = 0.5
#: Seconds :meth:`KmsgReader.start` waits for the thread to reach the log's end.
START_WAIT_S = 2.0
#: One ``/dev/kmsg`` record is at most this long (the kernel's CONSOLE_EXT_LOG_MAX).
RECORD_MAX = 8192
#: A followed file's unfinished line is dropped beyond this many bytes.
MAX_LINE = 65536
#: Seconds between attempts to open a log that does not exist (yet).
MISSING_RETRY_S = 1.0

FaultSink = Callable[[KernelFault], None]


def refused_notice(path: str, exc: OSError) -> str:
    """The one line for a kernel log this process may not read, naming both fixes."""
    return (
        f"Xids are not read from the kernel log: {path} is not readable "
        f"({exc.strerror or one_line(exc)}); run the service with CAP_SYSLOG (the shipped "
        "unit does; kernel.dmesg_restrict=1 requires it) or set GPUTEL_KMSG= to stop trying"
    )


class KmsgReader:
    """Follows one kernel log and hands each Xid or SXid line to ``deliver``, on its thread."""

    def __init__(self, path: str, poll_s: float = POLL_S) -> None:
        self.path = path
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._positioned = threading.Event()
        self._notice = StandingNotice(log)
        self._thread: threading.Thread | None = None
        self._overwritten_said = False

    @property
    def notice(self) -> str | None:
        return self._notice.text

    def start(self, deliver: FaultSink) -> None:
        """Start the thread and wait (briefly) until it stands at the log's end, so a line
        written once this returns is read."""
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="gputel-kmsg", daemon=True
        )
        self._thread.start()
        self._positioned.wait(START_WAIT_S)

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread to end (tests); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # ------------------------------------------------------------------ the thread
    def _run(self, deliver: FaultSink) -> None:
        try:
            self._read(deliver)
        except Exception as exc:  # a reader that breaks must never take the agent with it
            self._notice.say(
                f"Xids are no longer read from the kernel log {self.path}: {one_line(exc)}"
            )
        finally:
            self._positioned.set()

    def _read(self, deliver: FaultSink) -> None:
        at_start = True
        while not self._stop.is_set():
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                self._notice.say(
                    f"Xids are not read from the kernel log: {self.path} does not exist; "
                    "it is read from its start once it appears (GPUTEL_KMSG= stops trying)"
                )
                self._positioned.set()
                at_start = False
                self._stop.wait(MISSING_RETRY_S)
                continue
            except OSError as exc:
                self._notice.say(refused_notice(self.path, exc))
                return
            self._notice.say(None)  # it exists now
            try:
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    self._device(fd, deliver)
                else:
                    self._file(fd, at_start, deliver)
            finally:
                os.close(fd)
            return

    def _device(self, fd: int, deliver: FaultSink) -> None:
        # The privilege check (kernel.dmesg_restrict) is made at open: here reading works.
        os.lseek(fd, 0, os.SEEK_END)
        self._positioned.set()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not self._stop.is_set():
            try:
                record = os.read(fd, RECORD_MAX)
            except BlockingIOError:
                poller.poll(int(self._poll_s * 1000))
                continue
            except InterruptedError:
                continue
            except BrokenPipeError:
                if not self._overwritten_said:
                    self._overwritten_said = True
                    log.warning(
                        "kernel log records were overwritten before they were read; an Xid "
                        "among them is missed here (NVML may still have delivered it)"
                    )
                continue
            if record:
                self._line(record_message(record), deliver)
            else:
                poller.poll(int(self._poll_s * 1000))

    def _file(self, fd: int, at_start: bool, deliver: FaultSink) -> None:
        if at_start:
            os.lseek(fd, 0, os.SEEK_END)
        self._positioned.set()
        pending = b""
        while not self._stop.is_set():
            chunk = os.read(fd, 65536)
            if chunk:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > MAX_LINE:
                    pending = b""
                for raw in lines:
                    self._line(raw.decode("utf-8", errors="replace"), deliver)
                continue
            moved = self._moved(fd)
            if moved is None:
                self._stop.wait(self._poll_s)
                continue
            if moved == "truncated":
                os.lseek(fd, 0, os.SEEK_SET)
                pending = b""
                continue
            # Replaced under its name. The writer may have added to the old file between the
            # empty read above and this look (a daemon's last line before it reopens): read the
            # old one to its end once more, and move on only when that finds nothing.
            if self._drain(fd, pending, deliver):
                pending = b""
                continue
            try:
                new = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                self._stop.wait(self._poll_s)
                continue
            os.dup2(new, fd)
            os.close(new)
            pending = b""

    def _drain(self, fd: int, pending: bytes, deliver: FaultSink) -> bool:
        """Read the rest of a replaced file, its unfinished last line included; True when
        there was any."""
        rest = b""
        while chunk := os.read(fd, 65536):
            rest += chunk
        if not rest:
            return False
        for raw in (pending + rest).split(b"\n"):
            if raw:
                self._line(raw.decode("utf-8", errors="replace"), deliver)
        return True

    def _moved(self, fd: int) -> str | None:
        """``truncated``, ``replaced`` or None (the same file, just not grown)."""
        mine = os.fstat(fd)
        if mine.st_size < os.lseek(fd, 0, os.SEEK_CUR):
            return "truncated"
        try:
            named = os.stat(self.path)
        except OSError:
            return None  # rotated away, the new one not created yet: keep the old one
        if (named.st_dev, named.st_ino) != (mine.st_dev, mine.st_ino):
            return "replaced"
        return None

    def _line(self, text: str, deliver: FaultSink) -> None:
        fault = parse_line(text)
        if fault is None:
            return
        try:
            deliver(fault)
        except Exception:
            log.exception("recording the kernel log's %s %d failed", fault.kind, fault.number)
