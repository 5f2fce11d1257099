"""Simulated GPUs: exact utilization, exact energy, a shared timeline, plausible other fields."""

from __future__ import annotations

import pytest

from gputel.schema import CLOCK_EVENT_REASONS, GPU_FIELDS
from gputel.sources.base import LIGHT_FIELDS, GpuSource, GpuSourceError
from gputel.sources.sim import (
    MEMORY_TOTAL_MIB,
    POWER_LIMIT_W,
    SIM_GPU_NAME,
    BoardModel,
    NoneGpuSource,
    SimGpuSource,
)
from gputel.sources.simpattern import parse_pattern

REASON_BITS = {name: bit for bit, name in CLOCK_EVENT_REASONS}
EPOCH = 1000.0


class FakeClock:
    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(
    pattern: str = "0:5,80:20,0:30",
    count: int = 3,
    selected: tuple[int, ...] | None = None,
    clock: FakeClock | None = None,
) -> tuple[SimGpuSource, FakeClock]:
    clock = clock or FakeClock()
    return SimGpuSource(count, pattern, selected, epoch=EPOCH, clock=clock), clock


def test_is_a_gpu_source() -> None:
    source: GpuSource = make()[0]
    assert source.name == "sim"
    assert NoneGpuSource().name == "none"


def test_three_gpus_follow_their_patterns() -> None:
    source, clock = make("0:5,80:20,0:30;100:10,0:1;30:2.5,60:2.5")
    expected = {
        0.0: {0: 0.0, 1: 100.0, 2: 30.0},
        2.25: {0: 0.0, 1: 100.0, 2: 30.0},
        2.5: {0: 0.0, 1: 100.0, 2: 60.0},
        4.75: {0: 0.0, 1: 100.0, 2: 60.0},
        5.0: {0: 80.0, 1: 100.0, 2: 60.0},
        10.0: {0: 80.0, 1: 0.0, 2: 60.0},
        24.5: {0: 80.0, 1: 0.0, 2: 60.0},
        25.0: {0: 0.0, 1: 0.0, 2: 60.0},
        10_000.0: {0: 0.0, 1: 0.0, 2: 60.0},
    }
    for t, utils in expected.items():
        clock.now = EPOCH + t
        assert source.read_utilization() == utils, t
        assert {r.index: r.utilization_gpu_pct for r in source.read()} == utils, t


def test_utilization_is_exactly_the_pattern_value() -> None:
    source, clock = make("12.5:0.3,99.9:0.7,33.3:1", count=1)
    timeline = parse_pattern("12.5:0.3,99.9:0.7,33.3:1")[0]
    seen = set()
    for step in range(0, 300):
        clock.now = EPOCH + step * 0.01
        util = source.read_utilization()[0]
        assert util == timeline.util_at(clock.now - EPOCH)
        assert source.read()[0].utilization_gpu_pct == util
        seen.add(util)
    assert seen == {12.5, 99.9, 33.3}


def test_devices_and_identity() -> None:
    source, _ = make(count=3)
    devices = source.devices()
    assert [d.index for d in devices] == [0, 1, 2]
    assert devices[2].uuid == "GPU-sim-00000000-0000-0000-0000-000000000002"
    assert len({d.uuid for d in devices}) == 3
    assert {d.name for d in devices} == {SIM_GPU_NAME}
    assert [(r.index, r.uuid, r.name) for r in source.read()] == [
        (d.index, d.uuid, d.name) for d in devices
    ]


def test_selection_keeps_each_gpus_own_pattern() -> None:
    source, _ = make("10:1;20:1;30:1", count=3, selected=(2, 0))
    assert [d.index for d in source.devices()] == [0, 2]
    assert source.read_utilization() == {0: 10.0, 2: 30.0}


def test_selecting_a_missing_gpu_is_an_error() -> None:
    with pytest.raises(GpuSourceError, match=r"GPU 3 .* only 2 simulated GPUs") as info:
        SimGpuSource(2, "0:1", (0, 3))
    assert "\n" not in str(info.value)


def test_bad_pattern_is_a_source_error() -> None:
    with pytest.raises(GpuSourceError, match=r"'x:1'"):
        SimGpuSource(1, "x:1", None)


def test_energy_is_the_exact_integral_of_power() -> None:
    source, clock = make("0:5,80:20,50:30", count=2)
    for index in (0, 1):
        model = BoardModel.for_index(index)
        p0, p80, p50 = model.power_w(0), model.power_w(80), model.power_w(50)
        cases = {
            0.0: 0.0,
            3.0: p0 * 3,
            5.0: p0 * 5,
            12.5: p0 * 5 + p80 * 7.5,
            25.0: p0 * 5 + p80 * 20,
            100.0: p0 * 5 + p80 * 20 + p50 * 75,
        }
        for t, joules in cases.items():
            clock.now = EPOCH + t
            assert source.read_energy_j()[index] == pytest.approx(joules, rel=1e-12, abs=1e-9)
            reading = next(r for r in source.read() if r.index == index)
            assert reading.energy_j == source.read_energy_j()[index]


def test_energy_matches_a_fine_riemann_sum_of_read_power() -> None:
    source, clock = make("0:1.5,100:2.25,35:1.25", count=1)
    dt = 0.001
    total = 0.0
    for step in range(6000):
        clock.now = EPOCH + step * dt
        total += source.read()[0].power_w * dt  # left sum: exact on piecewise-constant power
    clock.now = EPOCH + 6.0
    assert source.read_energy_j()[0] == pytest.approx(total, rel=1e-9)


def test_energy_does_not_depend_on_how_often_it_is_read() -> None:
    rare, rare_clock = make(count=1)
    often, often_clock = make(count=1)
    for step in range(1, 401):
        often_clock.now = EPOCH + step * 0.1
        often.read()
    rare_clock.now = EPOCH + 40.0
    assert rare.read_energy_j() == often.read_energy_j()


def test_energy_never_runs_backwards_before_the_epoch() -> None:
    source, clock = make(count=1)
    clock.now = EPOCH - 10
    assert source.read_energy_j() == {0: 0.0}


def test_two_sources_with_the_same_epoch_agree() -> None:
    clock = FakeClock(EPOCH + 12.34)
    agent = SimGpuSource(2, "0:5,80:20,0:30", None, epoch=EPOCH, clock=clock)
    child = SimGpuSource(2, "0:5,80:20,0:30", None, epoch=EPOCH, clock=clock)
    assert agent.read() == child.read()
    assert agent.read_energy_j() == child.read_energy_j()


def test_epoch_defaults_to_construction_time() -> None:
    clock = FakeClock(500.0)
    source = SimGpuSource(1, "0:5,80:20", None, clock=clock)
    assert source.epoch == 500.0
    clock.now = 504.9
    assert source.read_utilization() == {0: 0.0}
    clock.now = 505.0
    assert source.read_utilization() == {0: 80.0}


def test_correlated_fields_are_plausible() -> None:
    source, clock = make("0:100,100:300,50:10", count=1)
    clock.now = EPOCH + 99.0
    idle = source.read()[0]
    clock.now = EPOCH + 399.0
    busy = source.read()[0]
    clock.now = EPOCH + 400.5
    half = source.read()[0]

    for r in (idle, busy, half):
        assert r.memory_total_mib == MEMORY_TOTAL_MIB
        assert 0 < r.memory_used_mib <= r.memory_total_mib
        assert r.power_limit_w == POWER_LIMIT_W
        assert 0 < r.power_w <= r.power_limit_w
        assert r.fan_speed_pct is None  # passively cooled: unsupported, not 0
        assert r.ecc_corrected_volatile == 0
        assert r.ecc_uncorrected_volatile == 0
        assert r.memory_clock_mhz == 2619
        assert not r.lost

    assert 60 <= idle.power_w <= 80
    assert busy.power_w >= 650
    assert idle.power_w < half.power_w < busy.power_w
    assert idle.memory_used_mib < half.memory_used_mib < busy.memory_used_mib
    assert idle.utilization_memory_pct == 0
    assert 0 < half.utilization_memory_pct < busy.utilization_memory_pct <= 100
    assert idle.sm_clock_mhz == 345
    assert busy.sm_clock_mhz > 1000 and half.sm_clock_mhz == 1980
    assert idle.performance_state == 8
    assert busy.performance_state == 0
    assert idle.pcie_rx_bytes_per_s == 0
    assert 0 < half.pcie_rx_bytes_per_s < busy.pcie_rx_bytes_per_s
    assert 0 < half.pcie_tx_bytes_per_s < busy.pcie_tx_bytes_per_s

    assert idle.clock_event_reasons == REASON_BITS["gpu_idle"]
    assert busy.clock_event_reasons == REASON_BITS["sw_power_cap"]
    assert half.clock_event_reasons == 0

    # 300 s at 100 % is 12 time constants: at equilibrium, hotter than idle, below throttling.
    assert 25 <= idle.temperature_c <= 40
    assert idle.temperature_c + 30 < busy.temperature_c < 85


def test_temperature_lags_behind_utilization() -> None:
    source, clock = make("0:100,100:1000,0:1000", count=1)
    temps = []
    for t in (100.0, 105.0, 110.0, 130.0, 400.0, 1100.0, 1110.0):
        clock.now = EPOCH + t
        temps.append(source.read()[0].temperature_c)
    start, t5, t10, t30, t300, peak, cooling = temps
    assert start < t5 < t10 < t30 < t300
    assert t300 == pytest.approx(peak, abs=0.01)
    assert start < cooling < peak
    # it moves gradually, not in one step
    assert t5 - start < (peak - start) / 2


def test_per_gpu_variation_is_small_and_deterministic() -> None:
    a, clock_a = make("100:10", count=4)
    b, clock_b = make("100:10", count=4)
    clock_a.now = clock_b.now = EPOCH + 5
    ra, rb = a.read(), b.read()
    assert ra == rb
    powers = [r.power_w for r in ra]
    assert len(set(powers)) > 1
    assert max(powers) - min(powers) < 0.05 * max(powers)


def test_none_source_is_empty() -> None:
    source = NoneGpuSource()
    assert source.devices() == []
    assert source.read() == []
    assert source.read_utilization() == {}
    assert source.read_energy_j() == {}
    assert source.read_light() == []
    source.close()


def test_light_read_is_the_full_read_cut_to_the_light_fields() -> None:
    source, clock = make("0:5,80:20,100:3,0:30")
    for t in (0.0, 4.9, 5.0, 12.3, 25.5, 40.0):
        clock.now = EPOCH + t
        for light, full in zip(source.read_light(), source.read(), strict=True):
            assert (light.index, light.uuid, light.name, light.lost) == (
                full.index,
                full.uuid,
                full.name,
                False,
            )
            for name in (f.attr for f in GPU_FIELDS):
                expected = getattr(full, name) if name in LIGHT_FIELDS else None
                assert getattr(light, name) == expected, (t, name)
