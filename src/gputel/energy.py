"""The one energy rule: joules between two moments.

1. Where the hardware has a cumulative energy counter (NVML's total energy, RAPL's
   ``energy_uj``), the energy between two moments is the difference of two readings
   (:func:`counter_delta`). A counter that wraps at a known range is unwrapped once. Between two
   ticks (:func:`tick_energy`), a counter that goes backwards otherwise (it restarted: a driver
   reload, a GPU reset) gives that tick's power times the interval instead; without a power
   reading the interval is unknown (None), never a negative number.
2. Only where there is no counter, power is integrated by the trapezoid rule between two
   consecutive power samples (:class:`PowerIntegrator`). A missing power sample is a gap: the
   integral is unknown at that moment and is never bridged across it, so energy drawn during a
   gap is left out rather than guessed from its two ends.
3. Files report joules since they began (:class:`SinceStart`): the first reading is 0.0 and
   each later one adds :func:`tick_energy`; an unknown interval adds nothing and the
   accumulation continues from the new reading.
4. An allocation's energy is the sum of the energy of the intervals ending at its ticks: the
   rise of its GPUs' ``energy_j`` from the row before, within a file; at the first row of a file
   that continues a session (a new recorder, a new day), power integrated over the interval from
   the previous file's last row (trapezoid), when that interval is within
   :func:`continuation_gap`. The recorder (release reply, ``allocations.csv``), ``gputel
   report`` and the fleet report all count it this way (``telemetry/csv_sink.py`` keeps each
   tick's share; ``analysis/report.py`` sums the same intervals from the rows).

Pure Python, no I/O: sources, the CSV sink, allocation summaries and the analysis commands all
call it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from gputel.formats import finite


def counter_delta(
    before: float | None, after: float | None, wrap: float | None = None
) -> float | None:
    """Energy between two readings of one cumulative counter, in the counter's unit.

    ``wrap`` is the value at which the counter rolls over to 0 (RAPL's ``max_energy_range_uj``);
    a reading below the previous one is unwrapped once when it is known. None when a reading is
    missing or the counter went backwards without a known wrap.
    """
    if before is None or after is None:
        return None
    delta = after - before
    if delta >= 0:
        return delta
    if not wrap:
        return None
    delta += wrap
    return delta if delta >= 0 else None


def tick_energy(
    before: float | None,
    after: float | None,
    power_w: float | None,
    dt_s: float | None,
    wrap: float | None = None,
) -> float | None:
    """Energy of one tick from two readings of a counter: the rise, or, where the counter went
    backwards (restarted), ``power_w`` (that tick's power) times the interval ``dt_s``."""
    delta = counter_delta(before, after, wrap)
    if delta is not None or before is None or after is None:
        return delta
    if power_w is None or dt_s is None or dt_s <= 0:
        return None
    return power_w * dt_s


def trapezoid(p0: float | None, p1: float | None, dt_s: float) -> float | None:
    """Power integrated between two samples ``dt_s`` apart; None when either is unknown."""
    if p0 is None or p1 is None or dt_s <= 0:
        return None
    return (p0 + p1) / 2.0 * dt_s


def continuation_gap(interval_s: float) -> float:
    """The longest spacing across which a new file continues the previous one's session (a
    restarted recorder, a new day): energy is integrated across it, never across a longer one."""
    return max(2.5 * interval_s, 2.0)


def energy_between(
    start: Mapping[int, float | None], end: Mapping[int, float | None], keys: Iterable[int]
) -> float | None:
    """Joules used by ``keys`` (GPU indices) between two snapshots of their counters.

    None when there is no key or any one interval is unknown: a total over some GPUs only would
    look like the whole and be wrong.
    """
    total = 0.0
    counted = False
    for k in keys:
        delta = counter_delta(finite(start.get(k)), finite(end.get(k)))
        if delta is None:
            return None
        total += delta
        counted = True
    return round(total, 6) if counted else None


class PowerIntegrator:
    """Cumulative joules from power samples, for hardware without an energy counter.

    :meth:`add` returns the integral since the first sample (0.0 there), or None at a moment
    whose power is unknown. The integral only grows over intervals whose both ends were sampled.
    """

    __slots__ = ("_last", "joules")

    def __init__(self) -> None:
        self.joules = 0.0
        self._last: tuple[float, float] | None = None

    def gap(self) -> None:
        """Power was not sampled for a while (a lost GPU): the next sample starts afresh."""
        self._last = None

    def add(self, t: float, power_w: float | None) -> float | None:
        """Add the sample at monotonic time ``t``; a later ``t`` than the previous one."""
        if power_w is None:
            self.gap()
            return None
        last = self._last
        if last is not None and t > last[0]:
            self.joules += (last[1] + power_w) / 2.0 * (t - last[0])
        self._last = (t, power_w)
        return self.joules


class SinceStart:
    """Re-bases a cumulative counter to "since the first reading" (0.0 there)."""

    __slots__ = ("_last", "_last_t", "joules", "wrap")

    def __init__(self, wrap: float | None = None) -> None:
        self.wrap = wrap
        self.joules = 0.0
        self._last: float | None = None
        self._last_t: float | None = None

    def add(
        self, raw: float | None, t: float | None = None, power_w: float | None = None
    ) -> float | None:
        """The re-based value for this reading (at epoch seconds ``t``, with that moment's
        power, for a counter that restarted: :func:`tick_energy`); None when it is missing."""
        if raw is None:
            return None
        if self._last is not None:
            dt = None if t is None or self._last_t is None else t - self._last_t
            self.joules += tick_energy(self._last, raw, power_w, dt, self.wrap) or 0.0
        self._last = raw
        self._last_t = t
        return self.joules

    @property
    def started(self) -> bool:
        """Whether a reading was taken (the next one continues from it)."""
        return self._last is not None
