"""The one definition of an allocation's statistics, and their field names.

The recorder accumulates them per open allocation while it samples and ships them in
``recorder.json``; the agent copies them into the allocation's summary (``allocations.csv``, the
``release`` reply); the analysis commands compute the same fields from recorded CSV rows. All of
them use :class:`AllocationStats`, so a field means the same thing everywhere.

Pure Python, no I/O.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Protocol

from gputel.formats import finite
from gputel.schema import THROTTLE_MASK

#: The statistics fields, in the order of the ``allocations.csv`` columns.
STAT_FIELDS = (
    "util_mean_pct",
    "util_max_pct",
    "temperature_max_c",
    "memory_max_mib",
    "sm_active_mean_pct",
    "throttled_s",
)
"""``sm_active_mean_pct`` is the mean GPM SM activity (empty on GPUs without GPM);
``throttled_s`` the seconds in which at least one of the allocation's GPUs had a throttle reason
active (``schema.THROTTLE_MASK``: power cap, thermal or hardware slowdown), counted in ticks of
the sampling interval, empty when no GPU reported its reasons."""


class GpuValues(Protocol):
    """What a statistic needs from one GPU reading (``schema.GpuReading`` has it)."""

    @property
    def index(self) -> int: ...
    @property
    def utilization_gpu_pct(self) -> float | None: ...
    @property
    def temperature_c(self) -> float | None: ...
    @property
    def memory_used_mib(self) -> float | None: ...
    @property
    def sm_active_pct(self) -> float | None: ...
    @property
    def clock_event_reasons(self) -> int | None: ...


def _max(current: float | None, value: float) -> float:
    return value if current is None else max(current, value)


class AllocationStats:
    """Running statistics over the GPU readings of one allocation.

    ``samples`` counts ticks (one sample of all the allocation's GPUs); the mean and maxima run
    over every GPU reading that has the value. A missing value is skipped, never counted as 0.
    """

    __slots__ = (
        "energy_j",
        "memory_max_mib",
        "samples",
        "sm_n",
        "sm_sum",
        "temperature_max_c",
        "throttled_s",
        "util_max_pct",
        "util_n",
        "util_sum",
    )

    def __init__(self) -> None:
        self.samples = 0
        self.util_sum = 0.0
        self.util_n = 0
        self.util_max_pct: float | None = None
        self.temperature_max_c: float | None = None
        self.memory_max_mib: float | None = None
        self.sm_sum = 0.0
        self.sm_n = 0
        self.throttled_s: float | None = None
        self.energy_j: float | None = None
        """Joules of the intervals ending at its ticks, on its GPUs (``gputel.energy``, rule
        4); None until one is known. An unknown interval is left out, as the report does."""

    def add_energy(
        self, shares: Mapping[int, float | None], only: Collection[int] | None = None
    ) -> None:
        """One tick's energy per GPU (``CsvSink.tick_energy``); ``only`` as for add_tick."""
        for gpu, joules in shares.items():
            if joules is not None and (only is None or gpu in only):
                self.energy_j = (self.energy_j or 0.0) + joules

    def add_values(
        self, util_pct: float | None, temperature_c: float | None, memory_mib: float | None
    ) -> None:
        """One GPU's reading (not a tick: call :meth:`add_tick` or count ``samples`` yourself)."""
        if util_pct is not None:
            self.util_sum += util_pct
            self.util_n += 1
            self.util_max_pct = _max(self.util_max_pct, util_pct)
        if temperature_c is not None:
            self.temperature_max_c = _max(self.temperature_max_c, temperature_c)
        if memory_mib is not None:
            self.memory_max_mib = _max(self.memory_max_mib, memory_mib)

    def add_tick(
        self,
        gpus: Iterable[GpuValues],
        only: tuple[int, ...] | None = None,
        interval_s: float | None = None,
    ) -> None:
        """One tick's readings; ``only`` limits them to the allocation's GPUs (None: all).
        ``interval_s`` (the sampling interval) counts a throttled tick into ``throttled_s``."""
        self.samples += 1
        reasons_known = throttled = False
        for g in gpus:
            if only is None or g.index in only:
                self.add_values(g.utilization_gpu_pct, g.temperature_c, g.memory_used_mib)
                sm = g.sm_active_pct
                if sm is not None:
                    self.sm_sum += sm
                    self.sm_n += 1
                reasons = g.clock_event_reasons
                if reasons is not None:
                    reasons_known = True
                    throttled = throttled or bool(reasons & THROTTLE_MASK)
        if reasons_known and interval_s is not None:
            self.throttled_s = (self.throttled_s or 0.0) + (interval_s if throttled else 0.0)

    @property
    def sm_active_mean_pct(self) -> float | None:
        return self.sm_sum / self.sm_n if self.sm_n else None

    @property
    def util_mean_pct(self) -> float | None:
        return self.util_sum / self.util_n if self.util_n else None

    def to_json(self) -> dict[str, Any]:
        """``{"samples": int, "util_readings": int, <STAT_FIELDS>: float | None}``, as
        ``recorder.json`` carries it; ``util_readings`` lets :meth:`from_json` rebuild the mean."""
        return {
            "samples": self.samples,
            "util_readings": self.util_n,
            "sm_readings": self.sm_n,
            "energy_j": self.energy_j,
            **{k: getattr(self, k) for k in STAT_FIELDS},
        }

    @classmethod
    def from_json(cls, entry: object) -> AllocationStats | None:
        """Running statistics that go on from a :meth:`to_json` object; None when it is not one.

        A restarted recorder continues its predecessor's statistics this way, so a summary
        covers the whole allocation, not just the time since the last restart.
        """
        fields = stats_from_json(entry)
        readings = entry.get("util_readings") if isinstance(entry, dict) else None
        samples = fields["samples"]
        if not isinstance(samples, int) or not _count(readings):
            return None
        assert isinstance(readings, int)
        mean = fields["util_mean_pct"]
        if (mean is None) != (readings == 0):
            return None
        out = cls()
        out.samples = samples
        out.util_n = readings
        out.util_sum = float(mean) * readings if mean is not None else 0.0
        out.util_max_pct = fields["util_max_pct"]
        out.temperature_max_c = fields["temperature_max_c"]
        out.memory_max_mib = fields["memory_max_mib"]
        sm_readings = entry.get("sm_readings") if isinstance(entry, dict) else None
        sm_mean = fields["sm_active_mean_pct"]
        if _count(sm_readings) and sm_mean is not None:
            assert isinstance(sm_readings, int)
            out.sm_n = sm_readings
            out.sm_sum = float(sm_mean) * sm_readings
        throttled = fields["throttled_s"]
        out.throttled_s = None if throttled is None else float(throttled)
        out.energy_j = finite(entry.get("energy_j")) if isinstance(entry, dict) else None
        return out


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def stats_from_json(entry: object) -> dict[str, float | int | None]:
    """A ``to_json`` object read back from a file: every field present, anything malformed None."""
    src = entry if isinstance(entry, dict) else {}
    out: dict[str, float | int | None] = {}
    for key in STAT_FIELDS:
        out[key] = finite(src.get(key))
    samples = src.get("samples")
    out["samples"] = samples if _count(samples) else None
    return out
