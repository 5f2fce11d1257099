"""Simulated GPU events (``GPUTEL_SIM_EVENTS``): Xids on a schedule, for the demo and tests.

The grammar is comma-separated ``GPU:XID@SECONDS`` entries, e.g. ``0:79@12,1:48@30`` (GPU 0
reports Xid 79 twelve seconds into the simulated timeline, GPU 1 Xid 48 at thirty). SECONDS
counts on the same shared timeline as ``GPUTEL_SIM_PATTERN`` and may have a fraction; the same
entry twice is two events (repeats are what the counters must show). Parsing is strict, naming
the bad entry, because a typo in a test schedule should fail rather than silently drop a fault.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gputel.sources.base import EventSink
from gputel.sources.simpattern import parse_number
from gputel.supervisor.events import XID

#: Highest GPU index and Xid accepted: beyond any real machine or driver, below any overflow.
MAX_GPU = 1023
MAX_XID = 65535


class SimEventsError(ValueError):
    """A malformed ``GPUTEL_SIM_EVENTS``; the message names the offending entry."""


@dataclass(frozen=True, slots=True)
class SimEvent:
    gpu: int
    xid: int
    at_s: float
    """Seconds after the simulated timeline's epoch."""


def _whole(text: str, what: str, entry: str, top: int, low: int) -> int:
    t = text.strip()
    if not t.isascii() or not t.isdigit():
        raise SimEventsError(f"entry {entry!r}: {what} {t!r} is not a whole number")
    value = int(t)
    if not low <= value <= top:
        raise SimEventsError(f"entry {entry!r}: {what} must be within {low}-{top}")
    return value


def parse_sim_events(text: str, gpu_count: int | None = None) -> tuple[SimEvent, ...]:
    """Parse ``GPU:XID@SECONDS,...`` (empty text: no events), in the order given.

    With ``gpu_count`` (``GPUTEL_SIM_GPUS``), an entry for a GPU that does not exist is an error.
    """
    if not text.strip():
        return ()
    out: list[SimEvent] = []
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            raise SimEventsError(
                f"entry {position} of {text!r} is empty (expected GPU:XID@SECONDS)"
            )
        head, at, when = entry.partition("@")
        gpu_text, colon, xid_text = head.partition(":")
        if not at or not colon:
            raise SimEventsError(f"entry {entry!r} is not GPU:XID@SECONDS (e.g. 0:79@12)")
        gpu = _whole(gpu_text, "GPU", entry, MAX_GPU, 0)
        if gpu_count is not None and gpu >= gpu_count:
            raise SimEventsError(
                f"entry {entry!r} names GPU {gpu}, but GPUTEL_SIM_GPUS is {gpu_count} "
                f"(GPUs 0-{gpu_count - 1})"
            )
        xid = _whole(xid_text, "XID", entry, MAX_XID, 1)
        try:
            at_s = parse_number(when)
        except ValueError:
            raise SimEventsError(f"entry {entry!r}: SECONDS {when!r} is not a number") from None
        if at_s < 0:
            raise SimEventsError(f"entry {entry!r}: SECONDS must be >= 0")
        out.append(SimEvent(gpu, xid, at_s))
    return tuple(out)


class SimEventSchedule:
    """Hands out each simulated event once, when the shared timeline reaches it.

    The simulated GPU source asks :meth:`due` with the timeline's elapsed seconds; a clock that
    jumps far ahead delivers every event passed at once, in time order, and none twice. Events on
    GPUs that are not selected are never delivered, like a real driver's events on a GPU gputel
    did not register.
    """

    def __init__(self, events: Iterable[SimEvent], selected: Iterable[int] | None = None) -> None:
        chosen = None if selected is None else frozenset(selected)
        pending = [e for e in events if chosen is None or e.gpu in chosen]
        # Stable: events at the same moment keep the order they were written in.
        self._pending = sorted(pending, key=lambda e: e.at_s)
        self._next = 0

    def due(self, elapsed_s: float) -> list[SimEvent]:
        """Events at or before ``elapsed_s`` not handed out yet, oldest first."""
        start = self._next
        while self._next < len(self._pending) and self._pending[self._next].at_s <= elapsed_s:
            self._next += 1
        return self._pending[start : self._next]

    def next_at(self) -> float | None:
        """When the next event falls due (timeline seconds), or None when none is left."""
        return self._pending[self._next].at_s if self._next < len(self._pending) else None


class SimEventListener:
    """Delivers a :class:`SimEventSchedule` as GPU events, on a daemon thread like NVML's.

    ``clock() - epoch`` is the shared simulated timeline (the one the utilization pattern
    follows), so an event at 12 s falls 12 s into the pattern.
    """

    #: Longest sleep between two looks at the stop flag and the clock.
    POLL_S = 0.5

    def __init__(
        self, schedule: SimEventSchedule, epoch: float, clock: Callable[[], float]
    ) -> None:
        self._schedule = schedule
        self._epoch = epoch
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def notice(self) -> str | None:
        return None

    def start(self, deliver: EventSink) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="gputel-sim-events", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self, deliver: EventSink) -> None:
        while not self._stop.is_set():
            elapsed = self._clock() - self._epoch
            for event in self._schedule.due(elapsed):
                deliver(event.gpu, XID, event.xid)
            upcoming = self._schedule.next_at()
            if upcoming is None:
                return
            self._stop.wait(min(max(upcoming - elapsed, 0.01), self.POLL_S))
