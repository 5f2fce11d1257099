"""The NVML source against a scenario-driven fake binding: what a real node can throw at it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

import fake_pynvml as fk
from fake_pynvml import FakeNvml, gpu_row
from gputel.schema import MIB, GpuReading
from gputel.sources import nvml
from gputel.sources.base import LIGHT_FIELDS, GpuSourceError

MEASUREMENTS = [
    f.name for f in fields(GpuReading) if f.name not in ("index", "uuid", "name", "lost")
]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _fresh_nvml_state() -> Iterator[None]:
    nvml.reset_nvml_state()
    yield
    nvml.reset_nvml_state()


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeNvml]:
    def _install(gpus: list[dict[str, Any]], **kwargs: Any) -> FakeNvml:
        fake = FakeNvml(gpus, **kwargs)
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return _install


def _calls(fake: FakeNvml, fn: str, gpu: int) -> int:
    return fake.gpu_calls[(fn, gpu)]


# ------------------------------------------------------------------------------ full readings
def test_full_reading_converts_every_field_to_its_unit(install: Callable[..., FakeNvml]) -> None:
    install([gpu_row(0), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    assert src.name == "nvml"
    assert [(d.index, d.uuid, d.name) for d in src.devices()] == [
        (0, "GPU-00000000-fake-uuid", "NVIDIA H100 80GB HBM3"),
        (1, "GPU-00000001-fake-uuid", "NVIDIA H100 80GB HBM3"),
    ]
    r0, r1 = src.read()
    assert r0 == GpuReading(
        index=0,
        uuid="GPU-00000000-fake-uuid",
        name="NVIDIA H100 80GB HBM3",
        lost=False,
        utilization_gpu_pct=50.0,
        utilization_memory_pct=20.0,
        memory_used_mib=10240.0,
        memory_total_mib=81920.0,
        temperature_c=40.0,
        power_w=300.0,
        power_limit_w=700.0,
        energy_j=5000.0,
        sm_clock_mhz=1980.0,
        memory_clock_mhz=2619.0,
        fan_speed_pct=30.0,
        performance_state=0,
        clock_event_reasons=0x4,
        pcie_rx_bytes_per_s=1000 * 1024.0,
        pcie_tx_bytes_per_s=2000 * 1024.0,
        ecc_corrected_volatile=2,
        ecc_uncorrected_volatile=0,
    )
    assert r1.power_w == 301.0 and r1.energy_j == 5000.001 and r1.temperature_c == 41.0
    assert all(getattr(r0, m) is not None for m in MEASUREMENTS)
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    assert src.read_energy_j() == {0: 5000.0, 1: 5000.001}
    src.close()


def test_str_identity_and_a_subset_of_gpus(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(i, uuid=f"GPU-{i}", name="Tesla T4") for i in range(4)])
    src = nvml.open_nvml((3, 1), clock=Clock())
    assert [(d.index, d.uuid, d.name) for d in src.devices()] == [
        (1, "GPU-1", "Tesla T4"),
        (3, "GPU-3", "Tesla T4"),
    ]
    assert [r.index for r in src.read()] == [1, 3]
    assert set(src.read_utilization()) == {1, 3}
    assert not any(gpu in (0, 2) for (_, gpu) in fake.gpu_calls)
    src.close()


def test_light_read_is_one_call_per_gpu(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    before = sum(fake.calls.values())
    src.read_utilization()
    assert sum(fake.calls.values()) - before == 2
    assert fake.calls["nvmlDeviceGetUtilizationRates"] == 2
    src.close()


def test_light_read_gives_the_cheap_fields_equal_to_the_full_read(
    install: Callable[..., FakeNvml],
) -> None:
    fake = install([gpu_row(0), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    before = dict(fake.calls)
    light = src.read_light()
    asked = {fn for fn, n in fake.calls.items() if n != before.get(fn, 0)}
    # No PCIe sampling, no batch, no power limit, no processes: only what the driver keeps.
    assert asked == {
        "nvmlDeviceGetUtilizationRates",
        "nvmlDeviceGetMemoryInfo_v2",
        "nvmlDeviceGetTemperatureV",
        "nvmlDeviceGetPowerUsage",
        "nvmlDeviceGetTotalEnergyConsumption",
        "nvmlDeviceGetClockInfo",
    }
    full = src.read()
    for lr, fr in zip(light, full, strict=True):
        assert (lr.index, lr.uuid, lr.name, lr.lost) == (fr.index, fr.uuid, fr.name, False)
        for m in MEASUREMENTS:
            expected = getattr(fr, m) if m in LIGHT_FIELDS else None
            assert getattr(lr, m) == expected, m
    src.close()


def test_light_read_of_a_lost_gpu_and_without_an_energy_counter(
    install: Callable[..., FakeNvml],
) -> None:
    row = gpu_row(1)
    del row["energy_mj"]
    fake = install([gpu_row(0), row], timeline={0: {0: {"lost": True}}})
    src = nvml.open_nvml(None, clock=Clock())
    fake.advance()
    r0, r1 = src.read_light()
    assert r0.lost and all(getattr(r0, m) is None for m in MEASUREMENTS)
    # No counter: empty, never an integral of two power samples a tick apart.
    assert not r1.lost and r1.energy_j is None and r1.power_w == 301.0
    src.close()


# ----------------------------------------------------------------------------------- lost GPUs
@pytest.mark.parametrize("error", [fk.NVMLError_GpuIsLost, fk.NVMLError_Unknown])
def test_one_lost_gpu_does_not_stop_the_others(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    # GPU 1 falls off the bus in the middle of a read (after utilization answered).
    fake = install([gpu_row(0), gpu_row(1), gpu_row(2)], timeline={1: {1: {"temperature": error}}})
    src = nvml.open_nvml(None, clock=Clock())
    assert all(not r.lost for r in src.read())
    fake.advance()
    caplog.set_level(logging.WARNING, logger="gputel.nvml")
    readings = src.read()
    lost = readings[1]
    assert lost.lost and (lost.index, lost.uuid) == (1, "GPU-00000001-fake-uuid")
    assert all(getattr(lost, m) is None for m in MEASUREMENTS)
    for healthy in (readings[0], readings[2]):
        assert not healthy.lost
        assert all(getattr(healthy, m) is not None for m in MEASUREMENTS)
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1

    # Never asked again, on any path, yet still reported with its identity.
    asked = sum(n for (_, gpu), n in fake.gpu_calls.items() if gpu == 1)
    for _ in range(3):
        again = src.read()
        assert again[1].lost and again[1].uuid == "GPU-00000001-fake-uuid"
        assert not again[0].lost and again[0].power_w == 300.0
        assert src.read_utilization() == {0: 50.0, 1: None, 2: 52.0}
        assert src.read_energy_j()[1] is None
    assert sum(n for (_, gpu), n in fake.gpu_calls.items() if gpu == 1) == asked
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1
    src.close()


def test_gpu_lost_during_light_read(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0), gpu_row(1)], timeline={1: {0: {"lost": True}}})
    src = nvml.open_nvml(None, clock=Clock())
    fake.advance()
    assert src.read_utilization() == {0: None, 1: 51.0}
    r0, r1 = src.read()
    assert r0.lost and not r1.lost
    src.close()


def test_gpu_lost_in_a_batched_value(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, ecc_uncorrected=fk.NVMLError_GpuIsLost), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    r0, r1 = src.read()
    assert r0.lost and r0.utilization_gpu_pct is None
    assert not r1.lost and r1.ecc_uncorrected_volatile == 0
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2
    src.close()


def test_gpu_already_lost_at_open(install: Callable[..., FakeNvml]) -> None:
    install([gpu_row(0, handle=fk.NVMLError_GpuIsLost), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    assert [(d.index, d.uuid) for d in src.devices()] == [(0, ""), (1, "GPU-00000001-fake-uuid")]
    r0, r1 = src.read()
    assert r0.lost and r0.index == 0 and not r1.lost
    src.close()


# ---------------------------------------------------------------------------- lost GPUs return
def _gpu_calls(fake: FakeNvml, gpu: int) -> int:
    return sum(n for (_, index), n in fake.gpu_calls.items() if index == gpu)


PROBE = ("nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetUtilizationRates")


def _lose_gpu_1(
    install: Callable[..., FakeNvml], error: type[Exception]
) -> tuple[FakeNvml, nvml.NvmlGpuSource, Clock]:
    """GPU 1 of two goes lost at t=0 on the first full read."""
    fake = install([gpu_row(0), gpu_row(1)])
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    fake.set(1, lost=error)
    assert [r.lost for r in src.read()] == [False, True]
    return fake, src, clock


@pytest.mark.parametrize("error", [fk.NVMLError_GpuIsLost, fk.NVMLError_Unknown])
def test_lost_gpu_is_left_alone_until_the_probe_interval(
    install: Callable[..., FakeNvml], error: type[Exception]
) -> None:
    fake, src, clock = _lose_gpu_1(install, error)
    asked = _gpu_calls(fake, 1)
    fake.set(1, lost=False)  # even a GPU that would answer is not asked early
    for now in (1.0, 30.0, 59.9):
        clock.now = now
        assert src.read()[1].lost
        assert src.read_utilization() == {0: 50.0, 1: None}
        assert src.read_energy_j() == {0: 5000.0, 1: None}
    assert _gpu_calls(fake, 1) == asked
    src.close()


@pytest.mark.parametrize("error", [fk.NVMLError_GpuIsLost, fk.NVMLError_Unknown])
def test_lost_gpu_stays_lost_after_a_failed_probe_quietly(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    fake, src, clock = _lose_gpu_1(install, error)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    asked = _gpu_calls(fake, 1)
    clock.now = 60.0
    assert src.read_utilization() == {0: 50.0, 1: None}
    # One probe, and it stops at its first failed call.
    assert _gpu_calls(fake, 1) == asked + 1
    assert _calls(fake, "nvmlDeviceGetHandleByIndex", 1) == 2  # at open, then the probe
    for now in (60.0, 100.0, 119.9):
        clock.now = now
        assert src.read()[1].lost and src.read_energy_j()[1] is None
    assert _gpu_calls(fake, 1) == asked + 1
    clock.now = 120.0
    assert src.read()[1].lost
    assert _gpu_calls(fake, 1) == asked + 2
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    src.close()


@pytest.mark.parametrize("error", [fk.NVMLError_GpuIsLost, fk.NVMLError_Unknown])
def test_lost_gpu_recovers_after_a_successful_probe(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture, error: type[Exception]
) -> None:
    fake, src, clock = _lose_gpu_1(install, error)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    fake.set(1, lost=False)
    clock.now = 75.0
    before = dict(fake.gpu_calls)
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    spent = {k: n - before.get(k, 0) for k, n in fake.gpu_calls.items() if k[1] == 1}
    # The probe, then the light read itself; nothing else.
    assert {k: n for k, n in spent.items() if n} == {
        ("nvmlDeviceGetHandleByIndex", 1): 1,
        ("nvmlDeviceGetUUID", 1): 1,
        ("nvmlDeviceGetUtilizationRates", 1): 2,
    }
    assert [r.getMessage() for r in caplog.records] == [
        "GPU 1 (GPU-00000001-fake-uuid) answers again: reading it again"
    ]
    for _ in range(3):
        r1 = src.read()[1]
        assert not r1.lost and (r1.uuid, r1.power_w, r1.energy_j) == (
            "GPU-00000001-fake-uuid",
            301.0,
            5000.001,
        )
        assert all(getattr(r1, m) is not None for m in MEASUREMENTS)
    assert src.read_energy_j() == {0: 5000.0, 1: 5000.001}
    assert len(caplog.records) == 1
    src.close()


def test_recovered_gpu_can_be_lost_again(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    fake, src, clock = _lose_gpu_1(install, fk.NVMLError_Unknown)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    fake.set(1, lost=False)
    clock.now = 60.0
    assert not src.read()[1].lost
    fake.set(1, lost=True)
    clock.now = 61.0
    assert src.read()[1].lost
    asked = _gpu_calls(fake, 1)
    clock.now = 120.0  # 59 s after the new loss: not yet
    assert src.read()[1].lost and _gpu_calls(fake, 1) == asked
    clock.now = 121.0
    assert src.read()[1].lost and _gpu_calls(fake, 1) == asked + 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "answers again" in messages[0] and "is lost" in messages[1]
    src.close()


def test_probe_refuses_a_different_gpu_at_the_same_index(install: Callable[..., FakeNvml]) -> None:
    fake, src, clock = _lose_gpu_1(install, fk.NVMLError_GpuIsLost)
    fake.set(1, lost=False, uuid=b"GPU-somebody-else")
    clock.now = 60.0
    assert src.read()[1].lost
    assert _calls(fake, "nvmlDeviceGetUtilizationRates", 1) == 1  # only the read before the loss
    src.close()


def test_gpu_lost_at_open_gets_its_identity_when_it_answers(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    fake = install([gpu_row(0), gpu_row(1, lost=True)])
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    assert [(d.index, d.uuid) for d in src.devices()] == [(0, "GPU-00000000-fake-uuid"), (1, "")]
    clock.now = 59.0
    assert src.read()[1].lost
    assert _calls(fake, "nvmlDeviceGetHandleByIndex", 1) == 1
    fake.set(1, lost=False)
    clock.now = 60.0
    r1 = src.read()[1]
    assert not r1.lost
    assert (r1.uuid, r1.name, r1.power_w) == (
        "GPU-00000001-fake-uuid",
        "NVIDIA H100 80GB HBM3",
        301.0,
    )
    assert src.devices()[1].uuid == "GPU-00000001-fake-uuid"
    src.close()


# ------------------------------------------------------------------------- unsupported fields
def test_unsupported_fields_are_none_and_not_asked_again(
    install: Callable[..., FakeNvml],
) -> None:
    # A passively cooled board without ECC enabled, an unknown P-state and no PCIe counters.
    row = gpu_row(0, pstate=32)
    for key in ("fan_pct", "ecc_corrected", "ecc_uncorrected", "pcie_rx_kbps", "pcie_tx_kbps"):
        del row[key]
    fake = install([row])
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(4):
        (r,) = src.read()
        assert r.fan_speed_pct is None
        assert r.ecc_corrected_volatile is None and r.ecc_uncorrected_volatile is None
        assert r.pcie_rx_bytes_per_s is None and r.pcie_tx_bytes_per_s is None
        assert r.performance_state is None
        assert r.power_w == 300.0 and r.energy_j == 5000.0
    assert fake.calls["nvmlDeviceGetFanSpeed"] == 1
    assert fake.calls["nvmlDeviceGetPcieThroughput"] == 2
    # ECC ids leave the batch after the first answer; only the energy counter stays.
    ecc = (3, 4)
    assert set(fake.field_requests[0][1]) == {*ecc, 83}
    assert all(ids == (83,) for _, ids in fake.field_requests[1:])
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 0
    src.close()


def test_functions_missing_from_an_older_binding_are_unsupported(
    install: Callable[..., FakeNvml],
) -> None:
    fake = install(
        [gpu_row(0)],
        missing=("nvmlDeviceGetFanSpeed", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetFieldValues"),
    )
    src = nvml.open_nvml(None, clock=Clock())
    (r,) = src.read()
    assert r.fan_speed_pct is None
    assert r.temperature_c == 40.0
    # Without the batch API the same values come one call at a time.
    assert (r.ecc_corrected_volatile, r.ecc_uncorrected_volatile, r.energy_j) == (2, 0, 5000.0)
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 2
    src.close()


def test_batch_call_unsupported_by_the_driver_falls_back_to_single_calls(
    install: Callable[..., FakeNvml],
) -> None:
    fake = install([gpu_row(0, field_values=fk.NVMLError_FunctionNotFound)])
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        (r,) = src.read()
        assert (r.ecc_corrected_volatile, r.energy_j) == (2, 5000.0)
    assert fake.calls["nvmlDeviceGetFieldValues"] == 1
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 6
    src.close()


def test_batching_saves_calls(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0), gpu_row(1)])
    src = nvml.open_nvml(None, clock=Clock())
    fake.calls.clear()
    src.read()
    assert fake.calls["nvmlDeviceGetFieldValues"] == 2
    assert fake.calls["nvmlDeviceGetTotalEccErrors"] == 0
    assert fake.calls["nvmlDeviceGetTotalEnergyConsumption"] == 0
    assert sum(fake.calls.values()) == 2 * 13
    src.close()


def test_other_errors_cost_one_tick_and_are_logged_once(
    install: Callable[..., FakeNvml], caplog: pytest.LogCaptureFixture
) -> None:
    fake = install(
        [gpu_row(0)],
        timeline={0: {0: {"temperature": fk.NVMLError_Timeout}}, 3: {0: {"temperature": 55}}},
    )
    src = nvml.open_nvml(None, clock=Clock())
    caplog.set_level(logging.WARNING, logger="gputel.nvml")
    for _ in range(3):
        (r,) = src.read()
        assert r.temperature_c is None and not r.lost
        assert r.power_w == 300.0
        fake.advance()
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 3
    assert len(caplog.records) == 1
    assert "temperature" in caplog.records[0].getMessage()
    (r,) = src.read()
    assert r.temperature_c == 55.0


def test_batched_value_with_a_transient_error(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, ecc_corrected=fk.NVMLError_Timeout)])
    src = nvml.open_nvml(None, clock=Clock())
    (r,) = src.read()
    assert r.ecc_corrected_volatile is None and r.ecc_uncorrected_volatile == 0
    fake.set(0, ecc_corrected=7)
    (r,) = src.read()
    assert r.ecc_corrected_volatile == 7


# ------------------------------------------------------------------------------------- energy
def test_energy_counter_gives_exact_deltas(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, energy_mj=1_000_000)], timeline={1: {0: {"energy_mj": 1_250_500}}})
    src = nvml.open_nvml(None, clock=Clock())
    (first,) = src.read()
    assert src.read_energy_j() == {0: 1000.0}
    fake.advance()
    (second,) = src.read()
    assert first.energy_j == 1000.0 and second.energy_j == 1250.5
    assert second.energy_j - first.energy_j == pytest.approx(250.5)
    assert src.read_energy_j() == {0: 1250.5}


def test_energy_integrates_power_where_the_counter_is_unsupported(
    install: Callable[..., FakeNvml],
) -> None:
    row = gpu_row(0, power_mw=100_000)
    del row["energy_mj"]
    fake = install([row, gpu_row(1)])
    clock = Clock(10.0)
    src = nvml.open_nvml(None, clock=clock)
    # The allocation path gets no integral: two samples minutes apart would invent the number.
    assert src.read_energy_j() == {0: None, 1: 5000.001}

    (r0, r1) = src.read()  # 100 W at t=10: the recorder's integral starts here, at 0
    assert r0.energy_j == 0.0
    assert r1.energy_j == 5000.001  # the counter where there is one

    clock.now = 11.0
    fake.set(0, power_mw=200_000)
    assert src.read()[0].energy_j == 150.0  # (100 + 200) / 2 W x 1 s

    clock.now = 13.0
    assert src.read()[0].energy_j == 550.0  # + 200 W x 2 s

    clock.now = 14.0
    fake.set(0, power_mw=fk.NVMLError_Timeout)  # a missing power sample: energy unknown then
    assert src.read()[0].energy_j is None

    clock.now = 16.0
    fake.set(0, power_mw=100_000)
    power_calls = _calls(fake, "nvmlDeviceGetPowerUsage", 0)
    assert src.read_energy_j() == {0: None, 1: 5000.001}
    assert _calls(fake, "nvmlDeviceGetPowerUsage", 0) == power_calls  # no sample taken for it
    assert src.read()[0].energy_j == 550.0  # never bridges the gap 13 -> 16 s

    clock.now = 17.0
    assert src.read()[0].energy_j == 650.0  # + 100 W x 1 s
    assert src.read_energy_j()[0] is None
    assert _calls(fake, "nvmlDeviceGetTotalEnergyConsumption", 0) == 1  # unsupported: asked once
    assert all(ids == (3, 4) for gpu, ids in fake.field_requests if gpu == 0)


def test_allocation_energy_is_empty_without_a_counter_even_when_only_that_path_reads(
    install: Callable[..., FakeNvml],
) -> None:
    # The agent's source: only read_energy_j at allocate and release, never read().
    row = gpu_row(0, power_mw=250_000)
    del row["energy_mj"]
    fake = install([row])
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    at_allocate = src.read_energy_j()
    clock.now = 600.0
    fake.set(0, power_mw=500_000)
    assert (at_allocate, src.read_energy_j()) == ({0: None}, {0: None})
    assert fake.calls["nvmlDeviceGetPowerUsage"] == 0
    src.close()


def test_no_energy_without_counter_or_power(install: Callable[..., FakeNvml]) -> None:
    row = gpu_row(0)
    del row["energy_mj"], row["power_mw"]
    install([row])
    src = nvml.open_nvml(None, clock=Clock())
    (r,) = src.read()
    assert r.energy_j is None and r.power_w is None
    assert src.read_energy_j() == {0: None}


# ------------------------------------------------------------------------------------ fallbacks
def test_memory_prefers_v2(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, memory_v2=(1 * 1024**3, 80 * 1024**3))])
    src = nvml.open_nvml(None, clock=Clock())
    (r,) = src.read()
    assert (r.memory_used_mib, r.memory_total_mib) == (1024.0, 81920.0)
    assert (
        fake.calls["nvmlDeviceGetMemoryInfo_v2"] == 1 and fake.calls["nvmlDeviceGetMemoryInfo"] == 0
    )


@pytest.mark.parametrize(
    ("scenario", "missing"),
    [
        pytest.param({"memory_v2": fk.NVMLError_FunctionNotFound}, (), id="driver-without-v2"),
        pytest.param(
            {"memory_v2": fk.NVMLError_ArgumentVersionMismatch}, (), id="version-mismatch"
        ),
        pytest.param({"memory_v2": fk.NVMLError_NotSupported}, (), id="v2-unsupported"),
        pytest.param({}, ("nvmlMemory_v2",), id="binding-without-v2"),
    ],
)
def test_memory_falls_back_to_v1(
    install: Callable[..., FakeNvml], scenario: dict[str, Any], missing: tuple[str, ...]
) -> None:
    fake = install([gpu_row(0, memory=(3 * MIB, 16 * MIB), **scenario)], missing=missing)
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        (r,) = src.read()
        assert (r.memory_used_mib, r.memory_total_mib) == (3.0, 16.0)
    assert fake.calls["nvmlDeviceGetMemoryInfo_v2"] == (0 if missing else 1)
    assert fake.calls["nvmlDeviceGetMemoryInfo"] == 3


@pytest.mark.parametrize(
    ("scenario", "missing"),
    [
        pytest.param(
            {"clock_event_reasons": fk.NVMLError_FunctionNotFound}, (), id="driver-too-old"
        ),
        pytest.param({}, ("nvmlDeviceGetCurrentClocksEventReasons",), id="binding-too-old"),
    ],
)
def test_clock_event_reasons_fall_back_to_throttle_reasons(
    install: Callable[..., FakeNvml], scenario: dict[str, Any], missing: tuple[str, ...]
) -> None:
    fake = install([gpu_row(0, clock_throttle_reasons=0x40, **scenario)], missing=missing)
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        (r,) = src.read()
        assert r.clock_event_reasons == 0x40
    assert fake.calls["nvmlDeviceGetCurrentClocksEventReasons"] == (0 if missing else 1)
    assert fake.calls["nvmlDeviceGetCurrentClocksThrottleReasons"] == 3


def test_temperature_falls_back_to_the_legacy_call(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, temperature_v=fk.NVMLError_FunctionNotFound, temperature=61)])
    src = nvml.open_nvml(None, clock=Clock())
    assert [src.read()[0].temperature_c for _ in range(2)] == [61.0, 61.0]
    assert fake.calls["nvmlDeviceGetTemperatureV"] == 1
    assert fake.calls["nvmlDeviceGetTemperature"] == 2


# --------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize(
    ("init_error", "expected"),
    [
        (fk.NVMLError_LibraryNotFound, "libnvidia-ml.so.1 not found"),
        (
            OSError("libnvidia-ml.so.1: cannot open shared object file"),
            "libnvidia-ml.so.1 not found",
        ),
        (fk.NVMLError_LibRmVersionMismatch, "reload the nvidia kernel module"),
        (fk.NVMLError_NoPermission, "/dev/nvidia*"),
        (fk.NVMLError_DriverNotLoaded, "driver is not loaded"),
        (fk.NVMLError_Uninitialized, "NVML could not start (Uninitialized)"),
    ],
)
def test_init_failures_are_one_classified_line(
    install: Callable[..., FakeNvml], init_error: Any, expected: str
) -> None:
    install([gpu_row(0)], init_error=init_error)
    with pytest.raises(GpuSourceError) as info:
        nvml.open_nvml(None)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if "not found" in expected or "not loaded" in expected:
        assert "GPUTEL_BACKEND=sim/none" in message


def test_library_message_is_exactly_the_documented_one(install: Callable[..., FakeNvml]) -> None:
    install([gpu_row(0)], init_error=fk.NVMLError_LibraryNotFound)
    with pytest.raises(GpuSourceError, match=r"^NVIDIA driver library libnvidia-ml\.so\.1 not"):
        nvml.open_nvml(None)


def test_no_gpu_is_an_error_and_releases_nvml(install: Callable[..., FakeNvml]) -> None:
    fake = install([])
    with pytest.raises(GpuSourceError, match="no NVIDIA GPU"):
        nvml.open_nvml(None)
    assert fake.calls["nvmlShutdown"] == 1 and fake.initialised == 0


def test_permission_denied_on_a_device_is_classified(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0, handle=fk.NVMLError_NoPermission)])
    with pytest.raises(GpuSourceError, match=r"/dev/nvidia\*"):
        nvml.open_nvml(None)
    assert fake.initialised == 0


def test_missing_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuSourceError, match="install nvidia-ml-py"):
        nvml.open_nvml(None)


def test_selecting_a_missing_index(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0), gpu_row(1)])
    with pytest.raises(GpuSourceError) as info:
        nvml.open_nvml((1, 2, 5))
    message = str(info.value)
    assert "GPU 2, 5" in message and "2 GPU(s)" in message and "GPUTEL_GPUS" in message
    assert fake.initialised == 0


def test_init_is_process_wide_and_close_is_idempotent(install: Callable[..., FakeNvml]) -> None:
    fake = install([gpu_row(0)])
    a = nvml.open_nvml(None)
    b = nvml.open_nvml((0,))
    assert fake.calls["nvmlInit"] == 1
    a.close()
    a.close()
    assert fake.calls["nvmlShutdown"] == 0
    assert b.read()[0].power_w == 300.0
    b.close()
    b.close()
    assert fake.calls["nvmlShutdown"] == 1 and fake.initialised == 0
    c = nvml.open_nvml(None)  # a later source starts NVML again
    assert fake.calls["nvmlInit"] == 2
    c.close()


def test_import_is_lazy() -> None:
    source = Path(nvml.__file__).read_text(encoding="utf-8")
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top if "pynvml" in line]


# ------------------------------------------------------------------------- the fake is honest
def test_fake_mirrors_the_installed_binding() -> None:
    import pynvml as real

    for name, value in fk.CONSTANTS.items():
        assert getattr(real, name) == value, name
    for name in fk.ERROR_CLASSES:
        real_cls = getattr(real, name)
        assert issubclass(real_cls, real.NVMLError)
        assert real_cls.__new__(real_cls).value == getattr(fk, name)().value, name
    for name in fk.FUNCTIONS:
        assert callable(getattr(real, name)), name
        assert callable(getattr(FakeNvml([]), name)), name
    assert type(real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)).__name__ == "NVMLError_GpuIsLost"
    assert type(fk.NVMLError(15)).__name__ == "NVMLError_GpuIsLost"
