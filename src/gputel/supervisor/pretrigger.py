"""The pre-trigger ring: the agent's light readings of the last ``GPUTEL_PRETRIGGER_SECONDS``.

Telemetry starts ``GPUTEL_START_SECONDS`` (plus the arming ticks) after the GPUs got busy, so a
session recorded from that moment misses the start of the job: NCCL initialisation, the data
loader warming up, the out-of-memory crash in second 3. Like an oscilloscope's pre-trigger, the
agent keeps the recent past (it reads the GPUs every tick anyway) and hands it to the recorder
when a session starts, which writes it at the head of the session's ``gpu-*.csv``
(``telemetry/head.py``).

Pure and bounded: no I/O, times are passed in by the caller (the agent's tick), and the memory
is fixed by the window: at most ``capacity`` ticks, each a flat array of doubles (``LIGHT_FIELDS``
per GPU, NaN for "no value") and a bitmask of lost GPUs; about 0.5 KiB per tick with 8 GPUs.
Readings become ``GpuReading`` objects only in :meth:`PretriggerRing.ticks`, once per session.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Sequence
from datetime import datetime, timezone

from gputel.schema import GpuReading
from gputel.settings import MAX_PRETRIGGER_TICKS
from gputel.sources.base import LIGHT_FIELDS, GpuIdentity
from gputel.telemetry.head import HeadTick

_NAN = math.nan
_WIDTH = len(LIGHT_FIELDS)


def ring_ticks(seconds: float, interval_s: float) -> int:
    """How many ticks cover ``seconds`` at ``interval_s`` (0 when the pre-trigger is off)."""
    if seconds <= 0:
        return 0
    return math.ceil(seconds / interval_s - 1e-9) + 1


class PretriggerRing:
    """The light readings of the selected GPUs over the last ``seconds``, oldest first."""

    def __init__(self, seconds: float, interval_s: float, devices: Sequence[GpuIdentity]) -> None:
        self.seconds = seconds
        self.capacity = min(ring_ticks(seconds, interval_s), MAX_PRETRIGGER_TICKS + 1)
        self._devices = list(devices)
        self._slot = {d.index: k for k, d in enumerate(self._devices)}
        self._ticks: deque[tuple[float, float, int, array[float]]] = deque(maxlen=self.capacity)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def __len__(self) -> int:
        return len(self._ticks)

    def add(self, monotonic: float, wall_epoch_s: float, readings: Sequence[GpuReading]) -> None:
        """Keep one tick's readings (``wall_epoch_s``: ``time.time()`` when the read began) and
        forget ticks older than the window."""
        if not self.capacity:
            return
        values = array("d", [_NAN]) * (_WIDTH * len(self._devices))
        lost = 0
        slot = self._slot
        for r in readings:
            k = slot.get(r.index)
            if k is None:
                continue
            if r.lost:
                lost |= 1 << k
                continue
            base = k * _WIDTH
            for j, name in enumerate(LIGHT_FIELDS):
                v = getattr(r, name)
                if v is not None:
                    values[base + j] = v
        ticks = self._ticks
        ticks.append((monotonic, wall_epoch_s, lost, values))
        oldest = monotonic - self.seconds
        while ticks[0][0] < oldest:
            ticks.popleft()

    def clear(self) -> None:
        self._ticks.clear()

    def ticks(self, now: float | None = None, after: float | None = None) -> list[HeadTick]:
        """The kept ticks as plain readings, oldest first; with ``now``, only the window
        ending there; with ``after``, only those newer than that monotonic time."""
        oldest = -math.inf if now is None else now - self.seconds
        out: list[HeadTick] = []
        for monotonic, wall, lost, values in self._ticks:
            if monotonic < oldest or (after is not None and monotonic <= after):
                continue
            gpus: list[GpuReading] = []
            for k, d in enumerate(self._devices):
                if lost >> k & 1:
                    gpus.append(GpuReading(d.index, d.uuid, d.name, lost=True))
                    continue
                reading = GpuReading(d.index, d.uuid, d.name)
                base = k * _WIDTH
                for j, name in enumerate(LIGHT_FIELDS):
                    v = values[base + j]
                    if v == v:  # not NaN
                        setattr(reading, name, v)
                gpus.append(reading)
            moment = datetime.fromtimestamp(wall, timezone.utc)
            out.append(HeadTick(moment, monotonic, tuple(gpus)))
        return out
