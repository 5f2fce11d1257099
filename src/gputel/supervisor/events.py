"""GPU fault events on record: the event, ``events.csv``, recent events, counters and capture.

An event (an Xid, an ECC error, a retired page, a GPU gone, a changed recovery action) is rare
and matters more than any per-second reading, so it is recorded whether telemetry is on or off:

- one row in ``GPUTEL_LOG_DIR/events.csv`` (opened per row like ``transitions.csv``, so
  logrotate may move it at any time; a failing disk costs rows, never the agent);
- a counter per (gpu, uuid, xid) and per (gpu, uuid, event), served as
  ``gputel_gpu_xid_errors_total`` and ``gputel_gpu_events_total``: every occurrence counts,
  repeats included, so ``increase()`` over them alerts on each new fault;
- a short ring of recent events for ``gputel status``;
- a capture window: telemetry stays forced on for ``GPUTEL_EVENT_CAPTURE_SECONDS`` after an
  event, so the minutes after a fault are recorded even on an idle node;
- a log line, at most a few per kind of event and interval (:class:`LineLimiter`): an Xid storm
  gets one summary line per interval with the counts of the lines left out, while its rows and
  counters stay exact.

Events come from two sources that see the same faults: NVML's event API and the kernel log
(``sources/kmsg.py``). The ``detail`` cell names the source of each row (``source=nvml``,
``source=kmsg``, ``source=sim``); :class:`SameFault` keeps one fault reported by both to one row.

Everything here is plain data and thread-safe: the listener threads record, while the agent
loop, the control socket and ``/metrics`` read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gputel.formats import FailureCounter, RowAppender, iso_utc_ms
from gputel.formats import csv_row as _csv_row
from gputel.supervisor.xid import DRAIN, RESET, WATCH, xid_info
from gputel.telemetry.promtext import Family

log = logging.getLogger(__name__)

EVENTS_FILE = "events.csv"
COLUMNS = ("timestamp", "gpu", "uuid", "event", "xid", "detail", "allocations")
#: How many events ``gputel status`` shows.
RECENT_EVENTS = 32

XID = "xid"
ECC_SBE = "ecc_sbe"
ECC_DBE = "ecc_dbe"
DRAM_RETIREMENT = "dram_retirement"
GPU_UNAVAILABLE = "gpu_unavailable"
RECOVERY_ACTION = "recovery_action"
SXID = "sxid"
SXID_FATAL = "sxid_fatal"

#: Where an event came from, the ``source=`` part of its ``detail`` cell.
SOURCE_KMSG = "kmsg"
#: Seconds within which the same fault reported by two sources is one event (:class:`SameFault`).
SAME_FAULT_S = 5.0


@dataclass(frozen=True, slots=True)
class EventKind:
    name: str
    action: str
    """The action class (see :mod:`gputel.supervisor.xid`); for Xids it comes from the Xid."""
    detail: str


#: Every event name gputel records (the ``event`` column and label), with its action and detail.
EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind(XID, "", "an Xid critical error; see its own row in the Xid table"),
    EventKind(
        ECC_SBE,
        WATCH,
        "single-bit ECC error (corrected); nothing now, plan a reset or RMA if the rate rises",
    ),
    EventKind(
        ECC_DBE,
        DRAIN,
        "double-bit ECC error (uncorrectable); results may be wrong: drain and reset the GPU",
    ),
    EventKind(
        DRAM_RETIREMENT,
        RESET,
        "a memory page or row was retired; reset the GPU when drained to apply it",
    ),
    EventKind(
        GPU_UNAVAILABLE,
        DRAIN,
        "the GPU became unavailable to the driver; drain the node and reset or reboot",
    ),
    EventKind(
        RECOVERY_ACTION,
        DRAIN,
        "the driver asks for a recovery action; read 'GPU Recovery Action' in nvidia-smi -q",
    ),
    EventKind(
        SXID,
        WATCH,
        "non-fatal NVSwitch error (SXid, kernel log); nothing now, look the SXid up in NVIDIA's "
        "Fabric Manager guide if it repeats",
    ),
    EventKind(
        SXID_FATAL,
        DRAIN,
        "fatal NVSwitch error (SXid, kernel log); NVLink traffic through the switch stopped: "
        "drain the node and reset the GPUs and switches (or reboot)",
    ),
)
EVENT_KIND = {k.name: k for k in EVENT_KINDS}
EVENT_NAMES = tuple(k.name for k in EVENT_KINDS)

XID_ERRORS_METRIC = "gputel_gpu_xid_errors_total"
EVENTS_METRIC = "gputel_gpu_events_total"
XID_ERRORS_HELP = "Xid critical errors reported by the driver since the agent started, by Xid."
EVENTS_HELP = "GPU events (Xid, ECC, retirement, unavailable, recovery) since the agent started."
#: The metric names this module serves.
METRICS = (XID_ERRORS_METRIC, EVENTS_METRIC)
XID_ERRORS = Family(XID_ERRORS_METRIC, "counter", XID_ERRORS_HELP)
EVENTS = Family(EVENTS_METRIC, "counter", EVENTS_HELP)

Sample = tuple[dict[str, str], float]


@dataclass(frozen=True, slots=True)
class GpuEvent:
    """One fault on one GPU, as recorded."""

    timestamp: float
    """Wall-clock seconds since the Unix epoch, when the agent received the event."""
    gpu: int | None
    """None for a fault that is on no selected GPU: an NVSwitch's SXid, or a kernel log Xid on
    a PCI address that none of the selected GPUs had at start (an empty cell)."""
    uuid: str | None
    """None when the driver could not say (an empty cell, never a made-up id)."""
    event: str
    xid: int | None
    """The Xid for ``event == "xid"``; None for every other event."""
    detail: str
    allocations: tuple[str, ...] = ()
    """Allocations open on this GPU at that moment: the jobs the fault hit."""
    source: str = ""
    """Who reported it: ``nvml``, ``kmsg`` or ``sim``."""

    @property
    def action(self) -> str:
        """The action class: from the Xid table for Xids, from the event kind otherwise."""
        if self.xid is not None:
            return xid_info(self.xid).action
        return EVENT_KIND[self.event].action

    def csv_values(self) -> tuple[object, ...]:
        return (
            iso_utc_ms(self.timestamp),
            self.gpu,
            self.uuid,
            self.event,
            self.xid,
            self.detail,
            ";".join(self.allocations),
        )

    def as_status(self) -> dict[str, Any]:
        """The event in ``gputel status --json``."""
        return {
            "timestamp": iso_utc_ms(self.timestamp),
            "gpu": self.gpu,
            "uuid": self.uuid,
            "event": self.event,
            "xid": self.xid,
            "action": self.action,
            "allocations": list(self.allocations),
            "source": self.source,
        }


def make_event(
    timestamp: float,
    gpu: int | None,
    uuid: str | None,
    event: str,
    xid: int | None = None,
    allocations: Iterable[str] = (),
    source: str = "",
    note: str = "",
) -> GpuEvent:
    """A :class:`GpuEvent` with its detail from the tables, then ``source=…`` and the
    source's own words (``note``: the kernel's line); refuses a name or Xid that clash."""
    if event not in EVENT_KIND:
        raise ValueError(f"unknown GPU event {event!r} (expected one of {', '.join(EVENT_NAMES)})")
    if (event == XID) != (xid is not None):
        raise ValueError("an xid event needs its Xid number, and only an xid event has one")
    detail = xid_info(xid).detail if xid is not None else EVENT_KIND[event].detail
    if source:
        detail += f"; source={source}"
    if note:
        detail += f"; {note}"
    return GpuEvent(timestamp, gpu, uuid, event, xid, detail, tuple(allocations), source)


# ---------------------------------------------------------------------------------- events.csv
def csv_row(event: GpuEvent) -> str:
    """One ``events.csv`` row, ending in a newline; cells quoted where CSV needs it."""
    return _csv_row(event.csv_values())


class EventsLog:
    """Appends rows to ``log_dir/events.csv`` with the one whole-row rule; never raises.

    GPU events are still counted and shown by ``gputel status`` while the file cannot be written.
    """

    def __init__(self, log_dir: Path) -> None:
        self.path = Path(log_dir) / EVENTS_FILE
        self._rows = RowAppender(self.path, COLUMNS, log)

    @property
    def rows_failed(self) -> int:
        return self._rows.rows_failed

    @property
    def failures(self) -> FailureCounter:
        return self._rows.failures

    def append(self, event: GpuEvent) -> bool:
        return self._rows.append(event.csv_values())


# ---------------------------------------------------------------------------------- counters
class EventCounters:
    """Counts per (gpu, uuid, xid) and per (gpu, uuid, event) since the agent started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._xids: dict[tuple[int | None, str, int], int] = {}
        self._events: dict[tuple[int | None, str, str], int] = {}

    def add(self, event: GpuEvent) -> None:
        uuid = event.uuid or ""
        with self._lock:
            key = (event.gpu, uuid, event.event)
            self._events[key] = self._events.get(key, 0) + 1
            if event.xid is not None:
                xkey = (event.gpu, uuid, event.xid)
                self._xids[xkey] = self._xids.get(xkey, 0) + 1

    def xid_counts(self) -> dict[tuple[int | None, str, int], int]:
        with self._lock:
            return dict(self._xids)

    def event_counts(self) -> dict[tuple[int | None, str, str], int]:
        with self._lock:
            return dict(self._events)

    def families(self) -> list[tuple[Family, list[Sample]]]:
        """Both counter families with their samples, label order ``gpu, uuid, xid|event``; a
        fault on no selected GPU has ``gpu=""``, after the GPUs."""
        xids: list[Sample] = [
            ({"gpu": _label(g), "uuid": u, "xid": str(x)}, float(n))
            for (g, u, x), n in sorted(self.xid_counts().items(), key=_gpu_first)
        ]
        events: list[Sample] = [
            ({"gpu": _label(g), "uuid": u, "event": e}, float(n))
            for (g, u, e), n in sorted(self.event_counts().items(), key=_gpu_first)
        ]
        return [(XID_ERRORS, xids), (EVENTS, events)]

    def exposition(self) -> bytes:
        """Both counter families in the text format, HELP and TYPE even before any event."""
        return "".join(family.render(samples) for family, samples in self.families()).encode()


def _label(gpu: int | None) -> str:
    return "" if gpu is None else str(gpu)


def _gpu_first(item: tuple[tuple[int | None, str, Any], int]) -> tuple[Any, ...]:
    """GPUs in index order, then the faults on no selected GPU."""
    (gpu, uuid, what), _n = item
    return (gpu is None, gpu or 0, uuid, what)


# ---------------------------------------------------------------------------------- same fault
class SameFault:
    """One fault reported by two sources (NVML and the kernel log) is one event.

    Each report is paired with at most one report of another source for the same GPU, event
    and Xid within ``window_s``: the second of a pair is the same fault and is dropped. A
    report without a partner is recorded and waits ``window_s`` for one. So a genuine repeat
    still counts once per occurrence: three Xid 13s seen by both sources make three pairs,
    three rows; seen by one source only, three rows too. Reports on no selected GPU (``gpu``
    None) come from the kernel log only and are never paired. Times are passed in (monotonic
    seconds).
    """

    def __init__(self, window_s: float = SAME_FAULT_S) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._waiting: dict[tuple[int, str, int | None], deque[tuple[float, str]]] = {}

    def seen(self, gpu: int | None, event: str, xid: int | None, source: str, now: float) -> bool:
        """True when another source reported this fault within the window (drop this report)."""
        if gpu is None:
            return False
        key = (gpu, event, xid)
        with self._lock:
            for k in [k for k, q in self._waiting.items() if q[-1][0] < now - self.window_s]:
                del self._waiting[k]  # nothing in it is young enough to pair
            queue = self._waiting.setdefault(key, deque())
            while queue and queue[0][0] < now - self.window_s:
                queue.popleft()
            for i, (_t, other) in enumerate(queue):
                if other != source:
                    del queue[i]
                    if not queue:
                        del self._waiting[key]
                    return True
            queue.append((now, source))
            return False


# ---------------------------------------------------------------------------------- recent
class RecentEvents:
    """The last ``size`` events, oldest first, for ``gputel status``."""

    def __init__(self, size: int = RECENT_EVENTS) -> None:
        self._lock = threading.Lock()
        self._ring: deque[GpuEvent] = deque(maxlen=size)

    def add(self, event: GpuEvent) -> None:
        with self._lock:
            self._ring.append(event)

    def events(self) -> list[GpuEvent]:
        with self._lock:
            return list(self._ring)

    def as_status(self) -> list[dict[str, Any]]:
        return [e.as_status() for e in self.events()]


# ---------------------------------------------------------------------------------- capture
class CaptureWindow:
    """Telemetry forced on for ``seconds`` after the latest event (0 = never).

    Pure: times are passed in (monotonic seconds), so the agent loop and the tests drive it.
    A later event extends the window; the reason names the event that opened or extended it,
    for the transition row. Whether the operator's ``off`` overrides it is the state machine's
    rule, not this window's.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._until: float | None = None
        self.reason: str | None = None

    def trigger(self, event: GpuEvent, now: float) -> bool:
        """Open or extend the window for ``event``; False when capture is off."""
        if self.seconds <= 0:
            return False
        self._until = now + self.seconds
        self.reason = f"capture after {describe(event)}"
        return True

    def active(self, now: float) -> bool:
        return self._until is not None and now < self._until

    def remaining(self, now: float) -> float:
        return max(0.0, self._until - now) if self._until is not None else 0.0


def describe(event: GpuEvent) -> str:
    """A few words naming the event, e.g. ``Xid 79 on GPU 0``, ``ecc_dbe on GPU 1``,
    ``sxid_fatal on an NVSwitch``, ``Xid 79 on an unknown GPU``."""
    what = f"Xid {event.xid}" if event.xid is not None else event.event
    if event.gpu is not None:
        return f"{what} on GPU {event.gpu}"
    return (
        f"{what} on an NVSwitch"
        if event.event in (SXID, SXID_FATAL)
        else f"{what} on an unknown GPU"
    )


# ---------------------------------------------------------------------------------- log lines
class LineLimiter:
    """At most :attr:`BURST` log lines per key in each interval; the rest are counted and
    summarised in one line when the interval is over (at the next line or :meth:`flush`).

    The journal is for people: a storm of thousands of identical Xids in it hides everything
    else and costs disk, while events.csv and the counters already hold every one.
    Thread-safe: the event listener logs, the agent loop flushes.
    """

    BURST = 5
    INTERVAL_S = 60.0

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start: float | None = None
        self._shown: dict[str, int] = {}
        self._left_out: dict[str, int] = {}

    def log(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log the line unless ``key`` had its share this interval; True when it was logged."""
        with self._lock:
            self._roll(self._clock())
            shown = self._shown.get(key, 0)
            if shown >= self.BURST:
                self._left_out[key] = self._left_out.get(key, 0) + 1
                return False
            self._shown[key] = shown + 1
        self._log.log(level, msg, *args)
        return True

    def flush(self) -> None:
        """Write the summary of an interval that is over (the agent calls this every tick)."""
        with self._lock:
            self._roll(self._clock())

    def _roll(self, now: float) -> None:
        if self._start is not None and now - self._start < self.interval_s:
            return
        if self._left_out:
            total = sum(self._left_out.values())
            per_key = ", ".join(f"{k}: {n}" for k, n in sorted(self._left_out.items()))
            self._log.warning(
                "%d more GPU event log lines suppressed in the last %.0f s (%s); every event "
                "is in events.csv and gputel_gpu_events_total",
                total,
                now - (self._start or now),
                per_key,
            )
        self._start = now
        self._shown.clear()
        self._left_out.clear()


# ---------------------------------------------------------------------------------- recorder
#: Allocations whose Xids are remembered for their summaries at once, at most.
XIDS_TRACKED_MAX = 4096


class EventRecorder:
    """Records each event everywhere it belongs: the file, the counters, the recent ring, and
    (rate-limited) the log."""

    def __init__(
        self,
        log_dir: Path,
        recent: int = RECENT_EVENTS,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = EventsLog(log_dir)
        self.counters = EventCounters()
        self.recent = RecentEvents(recent)
        self._xids_lock = threading.Lock()
        self._xids: dict[str, dict[int, None]] = {}
        """Per allocation id, the Xid codes that hit it, in order: its release summary's
        ``xids`` (kept in memory only: an agent restart forgets them)."""
        self.lines = LineLimiter(log, clock=clock)

    def record(self, event: GpuEvent) -> None:
        self.counters.add(event)
        self.recent.add(event)
        if event.xid is not None and event.allocations:
            with self._xids_lock:
                if len(self._xids) > XIDS_TRACKED_MAX:
                    self._xids.clear()  # allocations never released; keep memory bounded
                for ident in event.allocations:
                    self._xids.setdefault(ident, {})[event.xid] = None
        self.log.append(event)
        level = logging.WARNING if event.action in (RESET, DRAIN) else logging.INFO
        self.lines.log(describe(event), level, "GPU event: %s: %s", describe(event), event.detail)

    def take_xids(self, ident: str) -> list[int]:
        """The distinct Xid codes that hit allocation ``ident``, first seen first; forgotten
        afterwards (the allocation is being released)."""
        with self._xids_lock:
            return list(self._xids.pop(ident, {}))
