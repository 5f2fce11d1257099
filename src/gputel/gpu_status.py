"""The per-GPU values ``gputel status`` shows under an agent, and where each one comes from.

The agent reads no GPU for a status request. Its GPUs' values come from readings already made:

* utilization and the activity the state machine judged: the agent's own poll, every tick;
* the rest (SM activity, memory, temperature, power and its limit, throttle reasons, stuck or
  lost) from the recorder's latest tick while telemetry is on: the recorder puts
  :func:`reading_values` of each GPU in ``recorder.json`` every tick;
* while telemetry is off, from the agent's light read (a pre-trigger or ``GPUTEL_ACTIVITY=sm``
  makes one every tick: :data:`gputel.sources.base.LIGHT_FIELDS`); memory total, power limit
  and throttle reasons are then unknown (null), as is everything but utilization without a
  light read.

Each GPU says which (``values_from``: ``recorder``, ``agent`` or null) and when (``values_at``).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from gputel.schema import GpuReading, clock_event_names

#: The reading fields a status GPU carries (besides identity and the agent's utilization).
STATUS_FIELDS: tuple[str, ...] = (
    "utilization_gpu_pct",
    "sm_active_pct",
    "memory_used_mib",
    "memory_total_mib",
    "temperature_c",
    "power_w",
    "power_limit_w",
    "sm_clock_mhz",
    "clock_event_reasons",
    "lost",
    "stuck",
)


def reading_values(reading: GpuReading) -> dict[str, Any]:
    """One GPU's status fields from a reading, for ``recorder.json`` (``index`` included)."""
    out: dict[str, Any] = {"index": reading.index}
    for name in STATUS_FIELDS:
        out[name] = getattr(reading, name)
    return out


def gpu_entries(
    devices: Iterable[Any],
    utilization: Mapping[int, float | None],
    activity: Mapping[int, float | None],
    light: Mapping[int, GpuReading],
    light_at: str | None,
    heartbeat: Mapping[str, Any],
    stuck: Collection[int] = (),
) -> list[dict[str, Any]]:
    """The status ``gpus``: per device, the agent's utilization and activity, then the other
    fields from the recorder's latest tick (``heartbeat``: a fresh ``recorder.json``), else from
    the agent's light read; a field no source has is None.

    ``stuck``: GPUs known to hang in a read by other means (the recorder's ``gpus_stuck``, the
    agent's own reads); each is ``stuck`` whatever its values say.
    """
    recorded: dict[int, Mapping[str, Any]] = {}
    entries = heartbeat.get("gpus")
    for item in entries if isinstance(entries, list) else []:
        if isinstance(item, dict) and isinstance(item.get("index"), int):
            recorded[item["index"]] = item
    out: list[dict[str, Any]] = []
    for d in devices:
        values: Mapping[str, Any] = {}
        source: str | None = None
        at: str | None = None
        if d.index in recorded:
            values, source = recorded[d.index], "recorder"
            at = heartbeat.get("timestamp") if isinstance(heartbeat.get("timestamp"), str) else None
        elif d.index in light:
            values, source, at = reading_values(light[d.index]), "agent", light_at
        entry: dict[str, Any] = {"index": d.index, "uuid": d.uuid, "name": d.name}
        # GPM as the source found it at open: available, not supported, refused: why; fix.
        entry["gpm"] = getattr(d, "gpm", None)
        for name in STATUS_FIELDS:
            value = values.get(name)
            entry[name] = bool(value) if name in ("lost", "stuck") else value
        entry["stuck"] = entry["stuck"] or d.index in stuck
        entry["utilization_gpu_pct"] = utilization.get(d.index)
        entry["activity_pct"] = activity.get(d.index)
        mask = entry["clock_event_reasons"]
        names = clock_event_names(mask if isinstance(mask, int) else None)
        entry["throttle_reasons"] = None if names is None else list(names)
        entry["values_from"] = source
        entry["values_at"] = at
        out.append(entry)
    return out
