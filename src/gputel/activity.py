"""What "busy" means for the state machine: the one rule for a GPU's activity (``GPUTEL_ACTIVITY``).

- ``utilization`` (default): NVML's utilization, the share of time any kernel ran. Every GPU has
  it, but one small kernel on one SM reads 100 %;
- ``sm``: GPM's SM activity (share of SMs busy) where the GPU has it, else its utilization, GPU
  by GPU. A GPU kept "busy" by a trickle of tiny kernels stays idle under ``sm``.

A GPU in MIG mode has no utilization at all: its activity is its busiest GPU instance's SM
activity under either signal, so telemetry starts when any instance gets busy.

Pure: the agent (live readings) and ``gputel replay`` (recorded rows) both call it.
"""

from __future__ import annotations

from collections.abc import Iterable

from gputel.schema import GpuReading, MigReading

ACTIVITY_SIGNALS: tuple[str, ...] = ("utilization", "sm")


def busiest_instance_pct(instances: Iterable[MigReading]) -> float | None:
    """A MIG GPU's activity: the highest SM activity of its GPU instances (None: none known)."""
    known = [r.sm_active_pct for r in instances if r.sm_active_pct is not None]
    return max(known) if known else None


def pick(
    utilization_pct: float | None, sm_active_pct: float | None, has_gpm: bool, signal: str
) -> float | None:
    """The activity of one GPU from its two signals: under ``sm`` a GPU with GPM is judged by
    its SM activity only (unknown when missing: the first tick after start, a failed sample,
    which starts nothing), every other GPU by its utilization."""
    if signal == "sm" and has_gpm:
        return sm_active_pct
    return utilization_pct


def activity_pct(reading: GpuReading, signal: str) -> float | None:
    """One GPU's activity % for the state machine; None when nothing was measured."""
    if reading.lost:
        return None
    if reading.mig:
        busiest = busiest_instance_pct(reading.mig)
        if busiest is not None:
            return busiest
    return pick(reading.utilization_gpu_pct, reading.sm_active_pct, reading.has_gpm, signal)
