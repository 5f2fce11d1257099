"""One definition of per-allocation statistics, shared by the recorder and the summaries."""

from __future__ import annotations

import json

import pytest

from gputel.allocstats import STAT_FIELDS, AllocationStats, stats_from_json
from gputel.schema import GpuReading


def gpu(index: int, util: float | None, temp: float | None, mem: float | None) -> GpuReading:
    r = GpuReading(index, f"GPU-{index}", "sim")
    r.utilization_gpu_pct, r.temperature_c, r.memory_used_mib = util, temp, mem
    return r


def test_accumulates_only_the_allocation_gpus_and_skips_missing_values() -> None:
    stats = AllocationStats()
    assert stats.to_json() == {
        "samples": 0,
        "util_readings": 0,
        "sm_readings": 0,
        "energy_j": None,
        **dict.fromkeys(STAT_FIELDS),
    }
    stats.add_tick([gpu(0, 10.0, 40.0, None), gpu(1, 100.0, 90.0, 9000.0)], only=(0,))
    stats.add_tick([gpu(0, None, 50.0, 1000.0), gpu(1, 100.0, 90.0, 9000.0)], only=(0,))
    stats.add_tick([gpu(0, 30.0, None, 500.0)], only=(0,))
    assert stats.to_json() == {
        "samples": 3,
        "util_readings": 2,
        "energy_j": None,
        "util_mean_pct": 20.0,
        "util_max_pct": 30.0,
        "temperature_max_c": 50.0,
        "memory_max_mib": 1000.0,
        "sm_readings": 0,
        "sm_active_mean_pct": None,
        "throttled_s": None,
    }
    every = AllocationStats()
    every.add_tick([gpu(0, 10.0, 40.0, None), gpu(1, 30.0, 90.0, 9000.0)])
    assert every.util_mean_pct == 20.0 and every.memory_max_mib == 9000.0


def test_read_back_from_json() -> None:
    stats = AllocationStats()
    stats.add_values(50.0, 60.0, 70.0)
    stats.samples = 1
    shipped = stats.to_json()
    assert shipped.pop("util_readings") == 1
    assert shipped.pop("sm_readings") == 0
    assert shipped.pop("energy_j") is None
    assert stats_from_json(stats.to_json()) == shipped
    bad = stats_from_json({"samples": -1, "util_mean_pct": "x", "memory_max_mib": True})
    assert bad == {"samples": None, **dict.fromkeys(STAT_FIELDS)}
    assert stats_from_json(None)["samples"] is None


def test_from_json_goes_on_where_to_json_stopped() -> None:
    whole = AllocationStats()
    first = AllocationStats()
    for util in (10.0, None, 30.0):
        for s in (whole, first):
            s.samples += 1
            s.add_values(util, 40.0, 100.0)
    carried = AllocationStats.from_json(json.loads(json.dumps(first.to_json())))
    assert carried is not None
    for s in (whole, carried):
        s.samples += 1
        s.add_values(80.0, 55.0, None)
    assert carried.to_json() == whole.to_json()
    assert carried.util_mean_pct == 40.0


@pytest.mark.parametrize(
    "entry",
    [
        None,
        {},
        {"samples": 3},  # written before util_readings existed: cannot rebuild the mean
        {"samples": 3, "util_readings": -1},
        {"samples": 3, "util_readings": 2, "util_mean_pct": None},
        {"samples": 3, "util_readings": 0, "util_mean_pct": 5.0},
        {"samples": True, "util_readings": 1, "util_mean_pct": 5.0},
    ],
)
def test_from_json_refuses_what_it_cannot_continue(entry: object) -> None:
    assert AllocationStats.from_json(entry) is None


def test_sm_activity_and_throttled_seconds() -> None:
    """SM activity averages over readings that have it; a tick counts as throttled when one of
    the allocation's GPUs has a real slowdown reason (not idle or an application clock)."""
    stats = AllocationStats()
    a, b = gpu(0, 50.0, 60.0, 1.0), gpu(1, 50.0, 60.0, 1.0)
    a.sm_active_pct, a.clock_event_reasons = 40.0, 0x1  # idle: not throttled
    b.sm_active_pct, b.clock_event_reasons = None, 0x0
    stats.add_tick([a, b], interval_s=0.5)
    assert (stats.sm_active_mean_pct, stats.throttled_s) == (40.0, 0.0)
    b.sm_active_pct, b.clock_event_reasons = 60.0, 0x4  # power cap
    stats.add_tick([a, b], interval_s=0.5)
    stats.add_tick([a, b], only=(0,), interval_s=0.5)  # GPU 1 is not the allocation's
    assert stats.sm_active_mean_pct == pytest.approx((40 + 40 + 60 + 40) / 4)
    assert stats.throttled_s == 0.5
    carried = AllocationStats.from_json(json.loads(json.dumps(stats.to_json())))
    assert carried is not None
    for s in (stats, carried):
        s.add_tick([b], interval_s=0.5)
    assert carried.to_json() == stats.to_json()
    unknown = AllocationStats()
    unknown.add_tick([gpu(0, 1.0, 1.0, 1.0)], interval_s=1.0)
    assert unknown.throttled_s is None and unknown.sm_active_mean_pct is None
