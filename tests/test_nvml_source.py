"""The NVML source through NVIDIA's real binding over the fake libnvidia-ml.so.1, in this process.

What a real node can throw at it: lost GPUs and their return, fields answering UNKNOWN, refused
handles, MIG mode, unsupported fields and functions missing from an older binding or driver,
energy without a counter, and every start-up failure.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import fields

import pytest

from fakedriver import (
    GPU_IS_LOST,
    MIB,
    NO_PERMISSION,
    UNKNOWN,
    FakeDriver,
    gpu,
)
from gputel.schema import GpuReading
from gputel.sources import nvml
from gputel.sources.base import LIGHT_FIELDS, GpuSourceError
from gputel.sources.nvml_gpm import GPM_METRICS

GPM_ONLY = {attr for attr, _c, _f in GPM_METRICS} - {"pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s"}

#: Every measurement of a GPU without GPM (GPM and MIG devices: tests/test_nvml_gpm.py).
MEASUREMENTS = [
    f.name
    for f in fields(GpuReading)
    if f.name not in ("index", "uuid", "name", "lost", "stuck", "field_errors", "mig", "has_gpm")
    and f.name not in GPM_ONLY
]


def measured(src: nvml.NvmlGpuSource) -> list[str]:
    """The measurements this binding can give: the recovery action is a field id only newer
    bindings define (nvidia-ml-py 12.535 has none)."""
    if hasattr(src.calls.api.module, "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION"):
        return MEASUREMENTS
    return [m for m in MEASUREMENTS if m != "recovery_action"]


TIMEOUT = 10
FUNCTION_NOT_FOUND = 13
ARGUMENT_VERSION_MISMATCH = 25


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rich_gpu(index: int, **overrides: object) -> dict[str, object]:
    """A GPU that answers every field, with distinct values per index; without GPM (its PCIe
    throughput comes from nvmlDeviceGetPcieThroughput; GPM: tests/test_nvml_gpm.py)."""
    values: dict[str, object] = {
        "gpm__supported": 0,
        "utilization__gpu_pct": 50 + index,
        "utilization__memory_pct": 20 + index,
        "memory__used_bytes": 10 * 1024**3,
        "memory__reserved_bytes": 0,
        "memory__total_bytes": 80 * 1024**3,
        "temperature_c": 40 + index,
        "power_mw": 300_000 + 1000 * index,
        "energy_mj": 5_000_000 + index,
        "clock__sm_mhz": 1980,
        "fan_speed_pct": 30,
        "clock_reasons": 0x4,
        "pcie__rx_kbps": 1000,
        "pcie__tx_kbps": 2000,
        "ecc__corrected": 2,
        "ecc__uncorrected": 0,
        "remapped_rows__correctable": 3,
        "remapped_rows__uncorrectable": 1,
        "remapped_rows__pending": 1,
        "remapped_rows__failure": 0,
        "field__230": 1,  # recovery action: GPU reset
    }
    values.update(overrides)
    return gpu(index, **values)


def world(*gpus: dict[str, object], **extra: object) -> dict[str, object]:
    values: dict[str, object] = {"device_count": len(gpus)}
    for g in gpus:
        values.update(g)
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return values


@pytest.fixture
def drv(inproc_driver: FakeDriver) -> Iterator[FakeDriver]:
    inproc_driver.write(world(rich_gpu(0), rich_gpu(1)))
    yield inproc_driver


def _uuid(i: int) -> str:
    return f"GPU-fake-{i:04d}-0000-0000-0000-000000000000"


# ------------------------------------------------------------------------------ full readings
def test_identities_carry_the_pci_bus_id_in_nvml_form(drv: FakeDriver) -> None:
    """The key that places the kernel log's Xid lines (``sources/kernel_xid.pci_key``)."""
    from gputel.sources.kernel_xid import pci_key

    drv.set(gpu__1__pci_bus_id="00000001:B7:00.0")
    src = nvml.open_nvml(None, clock=Clock())
    ids = [d.pci_bus_id for d in src.devices()]
    assert ids == ["00000000:18:00.0", "00000001:B7:00.0"]
    assert [pci_key(i) for i in ids] == ["0000:18:00", "0001:b7:00"]
    src.close()


def test_full_reading_converts_every_field_to_its_unit(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    assert src.name == "nvml"
    assert [(d.index, d.uuid, d.name) for d in src.devices()] == [
        (0, _uuid(0), "NVIDIA H100 80GB HBM3"),
        (1, _uuid(1), "NVIDIA H100 80GB HBM3"),
    ]
    r0, r1 = src.read()
    assert r0 == GpuReading(
        index=0,
        uuid=_uuid(0),
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
        remapped_rows_correctable=3,
        remapped_rows_uncorrectable=1,
        remapped_rows_pending=1,
        remapped_rows_failure=0,
        recovery_action=1 if "recovery_action" in measured(src) else None,
        processes=(),  # listed, none running
    )
    # The binding gives str, not bytes, and ctypes numbers: the reading holds plain values.
    assert type(r0.name) is str and type(r0.utilization_gpu_pct) is float
    assert r1.power_w == 301.0 and r1.energy_j == 5000.001 and r1.temperature_c == 41.0
    assert all(getattr(r0, m) is not None for m in measured(src))
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    assert src.read_energy_j() == {0: 5000.0, 1: 5000.001}
    src.close()


def test_a_subset_of_gpus(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world(*(rich_gpu(i, name="Tesla T4") for i in range(4))))
    src = nvml.open_nvml((3, 1), clock=Clock())
    assert [(d.index, d.name) for d in src.devices()] == [(1, "Tesla T4"), (3, "Tesla T4")]
    assert [r.index for r in src.read()] == [1, 3]
    assert set(src.read_utilization()) == {1, 3}
    assert inproc_driver.gpu_calls(0) == inproc_driver.gpu_calls(2) == 0
    src.close()


def test_light_read_is_one_call_per_gpu(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    before = [drv.gpu_calls(i) for i in (0, 1)]
    src.read_utilization()
    assert [drv.gpu_calls(i) - b for i, b in zip((0, 1), before, strict=True)] == [1, 1]
    src.close()


# ------------------------------------------------- fix: one field's UNKNOWN is not a lost GPU
def test_a_field_answering_unknown_is_empty_not_a_lost_gpu(
    drv: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    """Some boards answer NVML_ERROR_UNKNOWN for their fans every time; the GPU is healthy."""
    drv.set(gpu__1__fan_speed__error=UNKNOWN)
    caplog.set_level(logging.WARNING, logger="gputel.nvml")
    src = nvml.open_nvml(None, clock=Clock())
    for tick in range(1, 4):
        r0, r1 = src.read()
        assert not r1.lost
        assert r1.fan_speed_pct is None
        assert r1.utilization_gpu_pct == 51.0 and r1.power_w == 301.0
        assert r1.field_errors == {"fan_speed_pct": tick}
        assert r0.field_errors == {} and r0.fan_speed_pct == 30.0
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    assert len([r for r in caplog.records if "fan_speed_pct" in r.getMessage()]) == 1
    assert not [r for r in caplog.records if "lost" in r.getMessage()]
    src.close()


def test_every_read_failing_loses_the_gpu(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    drv.set(gpu__1__all__error=UNKNOWN)
    r0, r1 = src.read()
    assert r1.lost and not r0.lost
    assert all(getattr(r1, m) is None for m in MEASUREMENTS)
    src.close()


def test_an_unknown_utilization_is_this_ticks_none_in_the_light_read(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    drv.set(gpu__0__utilization__error=UNKNOWN)
    assert src.read_utilization() == {0: None, 1: 51.0}
    drv.set(gpu__0__utilization__error=None)
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    src.close()


def test_light_read_gives_the_cheap_fields_equal_to_the_full_read(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    keys = (
        "utilization", "memory", "temperature", "power", "energy", "clock",
        "pcie", "field_values", "power_limit", "processes", "ecc", "fan_speed",
        "clock_reasons", "max_clock", "pstate",
    )  # fmt: skip
    before = {k: drv.calls(k, 0) for k in keys}
    light = src.read_light()
    asked = {k for k in keys if drv.calls(k, 0) != before[k]}
    # No PCIe sampling, no batch, no power limit, no processes: only what the driver keeps.
    assert asked == {"utilization", "memory", "temperature", "power", "energy", "clock"}
    full = src.read()
    for lr, fr in zip(light, full, strict=True):
        assert (lr.index, lr.uuid, lr.name, lr.lost) == (fr.index, fr.uuid, fr.name, False)
        for m in MEASUREMENTS:
            expected = getattr(fr, m) if m in LIGHT_FIELDS else None
            assert getattr(lr, m) == expected, m
    src.close()


def test_light_read_of_a_lost_gpu_and_without_an_energy_counter(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    drv.set(gpu__0__all__error=GPU_IS_LOST, gpu__1__energy_mj=None)
    r0, r1 = src.read_light()
    assert r0.lost and all(getattr(r0, m) is None for m in MEASUREMENTS)
    # No counter: empty, never an integral of two power samples a tick apart.
    assert not r1.lost and r1.energy_j is None and r1.power_w == 301.0
    src.close()


# ----------------------------------------------------------------------------------- lost GPUs
def test_one_lost_gpu_does_not_stop_the_others(
    inproc_driver: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    drv = inproc_driver
    drv.write(world(rich_gpu(0), rich_gpu(1), rich_gpu(2)))
    src = nvml.open_nvml(None, clock=Clock())
    assert all(not r.lost for r in src.read())
    # GPU 1 falls off the bus in the middle of a read (after utilization answered).
    drv.set(gpu__1__temperature__error=GPU_IS_LOST)
    caplog.set_level(logging.WARNING, logger="gputel.nvml")
    readings = src.read()
    lost = readings[1]
    assert lost.lost and (lost.index, lost.uuid) == (1, _uuid(1))
    assert all(getattr(lost, m) is None for m in MEASUREMENTS)
    for healthy in (readings[0], readings[2]):
        assert not healthy.lost
        assert all(getattr(healthy, m) is not None for m in measured(src))
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1

    # Never asked again, on any path, yet still reported with its identity.
    asked = drv.gpu_calls(1)
    for _ in range(3):
        again = src.read()
        assert again[1].lost and again[1].uuid == _uuid(1)
        assert not again[0].lost and again[0].power_w == 300.0
        assert src.read_utilization() == {0: 50.0, 1: None, 2: 52.0}
        assert src.read_energy_j()[1] is None
    assert drv.gpu_calls(1) == asked
    assert len([r for r in caplog.records if "lost" in r.getMessage()]) == 1
    src.close()


def test_gpu_lost_during_light_read(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    drv.set(gpu__0__all__error=GPU_IS_LOST)
    assert src.read_utilization() == {0: None, 1: 51.0}
    r0, r1 = src.read()
    assert r0.lost and not r1.lost
    src.close()


def test_gpu_lost_in_a_batched_value(drv: FakeDriver) -> None:
    drv.set(gpu__0__ecc__error=GPU_IS_LOST)
    src = nvml.open_nvml(None, clock=Clock())
    r0, r1 = src.read()
    assert r0.lost and r0.utilization_gpu_pct is None
    assert not r1.lost and r1.ecc_uncorrected_volatile == 0
    assert drv.calls("field_values", 0) == drv.calls("field_values", 1) == 1
    src.close()


def test_gpu_already_lost_at_open(drv: FakeDriver) -> None:
    drv.set(gpu__0__handle__error=GPU_IS_LOST)
    src = nvml.open_nvml(None, clock=Clock())
    assert [(d.index, d.uuid) for d in src.devices()] == [(0, ""), (1, _uuid(1))]
    r0, r1 = src.read()
    assert r0.lost and r0.index == 0 and not r1.lost
    src.close()


# ---------------------------------------------------------------------------- lost GPUs return
def _lose_gpu_1(drv: FakeDriver) -> tuple[nvml.NvmlGpuSource, Clock]:
    """GPU 1 of two goes lost at t=0 on the first full read."""
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    drv.set(gpu__1__all__error=GPU_IS_LOST)
    assert [r.lost for r in src.read()] == [False, True]
    return src, clock


def test_lost_gpu_is_left_alone_until_the_probe_interval(drv: FakeDriver) -> None:
    src, clock = _lose_gpu_1(drv)
    asked = drv.gpu_calls(1)
    drv.set(gpu__1__all__error=None)  # even a GPU that would answer is not asked early
    for now in (1.0, 30.0, 59.9):
        clock.now = now
        assert src.read()[1].lost
        assert src.read_utilization() == {0: 50.0, 1: None}
        assert src.read_energy_j() == {0: 5000.0, 1: None}
    assert drv.gpu_calls(1) == asked
    src.close()


def test_lost_gpu_stays_lost_after_a_failed_probe_quietly(
    drv: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    src, clock = _lose_gpu_1(drv)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    asked = drv.gpu_calls(1)
    clock.now = 60.0
    assert src.read_utilization() == {0: 50.0, 1: None}
    # One probe, and it stops at its first failed call.
    assert drv.gpu_calls(1) == asked + 1
    assert drv.calls("handle", 1) == 2  # at open, then the probe
    for now in (60.0, 100.0, 119.9):
        clock.now = now
        assert src.read()[1].lost and src.read_energy_j()[1] is None
    assert drv.gpu_calls(1) == asked + 1
    clock.now = 120.0
    assert src.read()[1].lost
    assert drv.gpu_calls(1) == asked + 2
    assert [r for r in caplog.records if r.levelno >= logging.INFO] == []
    src.close()


def test_lost_gpu_recovers_after_a_successful_probe(
    drv: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    src, clock = _lose_gpu_1(drv)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    drv.set(gpu__1__all__error=None)
    clock.now = 75.0
    before = {key: drv.calls(key, 1) for key in ("handle", "uuid", "memory", "utilization")}
    assert src.read_utilization() == {0: 50.0, 1: 51.0}
    spent = {key: drv.calls(key, 1) - n for key, n in before.items()}
    # The probe (handle, identity, a memory query every GPU answers), then the light read.
    assert spent == {"handle": 1, "uuid": 1, "memory": 1, "utilization": 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"GPU 1 ({_uuid(1)}) answers again: reading it again"
    ]
    for _ in range(3):
        r1 = src.read()[1]
        assert not r1.lost and (r1.uuid, r1.power_w, r1.energy_j) == (_uuid(1), 301.0, 5000.001)
        assert all(getattr(r1, m) is not None for m in measured(src))
    assert src.read_energy_j() == {0: 5000.0, 1: 5000.001}
    assert len(caplog.records) == 1
    src.close()


def test_recovered_gpu_can_be_lost_again(drv: FakeDriver, caplog: pytest.LogCaptureFixture) -> None:
    src, clock = _lose_gpu_1(drv)
    caplog.set_level(logging.INFO, logger="gputel.nvml")
    caplog.clear()
    drv.set(gpu__1__all__error=None)
    clock.now = 60.0
    assert not src.read()[1].lost
    drv.set(gpu__1__all__error=GPU_IS_LOST)
    clock.now = 61.0
    assert src.read()[1].lost
    asked = drv.gpu_calls(1)
    clock.now = 120.0  # 59 s after the new loss: not yet
    assert src.read()[1].lost and drv.gpu_calls(1) == asked
    clock.now = 121.0
    assert src.read()[1].lost and drv.gpu_calls(1) == asked + 1
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "answers again" in messages[0] and "is lost" in messages[1]
    src.close()


def test_probe_refuses_a_different_gpu_at_the_same_index(drv: FakeDriver) -> None:
    src, clock = _lose_gpu_1(drv)
    drv.set(gpu__1__all__error=None, gpu__1__uuid="GPU-somebody-else")
    clock.now = 60.0
    assert src.read()[1].lost
    assert drv.calls("memory", 1) == 0  # the probe stopped at the identity check
    src.close()


def test_gpu_lost_at_open_gets_its_identity_when_it_answers(drv: FakeDriver) -> None:
    drv.set(gpu__1__all__error=GPU_IS_LOST)
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    assert [(d.index, d.uuid) for d in src.devices()] == [(0, _uuid(0)), (1, "")]
    clock.now = 59.0
    assert src.read()[1].lost
    assert drv.calls("handle", 1) == 1
    drv.set(gpu__1__all__error=None)
    clock.now = 60.0
    r1 = src.read()[1]
    assert not r1.lost
    assert (r1.uuid, r1.name, r1.power_w) == (_uuid(1), "NVIDIA H100 80GB HBM3", 301.0)
    assert src.devices()[1].uuid == _uuid(1)
    src.close()


# ----------------------------------------------------------- fix: a refused handle is left out
def test_a_refused_handle_leaves_that_gpu_out_with_one_notice(
    inproc_driver: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    inproc_driver.write(world(rich_gpu(0), rich_gpu(1), rich_gpu(2), gpu__1__handle__error=4))
    src = nvml.open_nvml(None, clock=Clock())
    assert [d.index for d in src.devices()] == [0, 2]
    assert [r.index for r in src.read()] == [0, 2]
    assert src.read_utilization() == {0: 50.0, 2: 52.0}
    (notice,) = src.notices
    assert notice.startswith("GPU 1 is unavailable: NVML refused its handle")
    assert "cgroup" in notice and "container" in notice
    src.close()


def test_every_handle_refused_is_the_permission_error(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world(rich_gpu(0), gpu__0__handle__error=NO_PERMISSION))
    with pytest.raises(GpuSourceError, match=r"/dev/nvidia\*"):
        nvml.open_nvml(None)


# -------------------------------------------------------------------------------- fix: MIG mode
def test_a_mig_gpu_is_not_asked_for_utilization_and_says_so(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world(rich_gpu(0, mig__mode=1), rich_gpu(1)))
    src = nvml.open_nvml(None, clock=Clock())
    (notice,) = src.notices
    assert notice.startswith(f"GPU 0 ({_uuid(0)}) is in MIG mode")
    assert "activity cannot be measured" in notice and "allocations" in notice
    assert src.read_utilization() == {0: None, 1: 51.0}
    r0, _ = src.read()
    assert not r0.lost and r0.utilization_gpu_pct is None and r0.power_w == 300.0
    assert inproc_driver.calls("utilization", 0) == 0
    src.close()


def test_a_lost_mig_gpu_comes_back(inproc_driver: FakeDriver) -> None:
    """The re-probe must not need utilization, which a MIG GPU never gives."""
    inproc_driver.write(
        world(
            rich_gpu(0, mig__mode=1, utilization__gpu_pct=None, utilization__memory_pct=None),
            rich_gpu(1),
        )
    )
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    inproc_driver.set(gpu__0__all__error=GPU_IS_LOST)
    assert src.read()[0].lost
    inproc_driver.set(gpu__0__all__error=None)
    clock.now = 60.0
    r0 = src.read()[0]
    assert not r0.lost and r0.power_w == 300.0
    src.close()


# ------------------------------------------------------------------------- unsupported fields
def test_unsupported_fields_are_none_and_not_asked_again(inproc_driver: FakeDriver) -> None:
    # A passively cooled board without ECC enabled, an unknown P-state and no PCIe counters.
    inproc_driver.write(
        world(
            rich_gpu(
                0,
                pstate=32,
                fan_speed_pct=None,
                ecc__corrected=None,
                ecc__uncorrected=None,
                pcie__rx_kbps=None,
                pcie__tx_kbps=None,
            )
        )
    )
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(4):
        (r,) = src.read()
        assert r.fan_speed_pct is None
        assert r.ecc_corrected_volatile is None and r.ecc_uncorrected_volatile is None
        assert r.pcie_rx_bytes_per_s is None and r.pcie_tx_bytes_per_s is None
        assert r.performance_state is None
        assert r.power_w == 300.0 and r.energy_j == 5000.0
        assert r.field_errors == {}
    assert inproc_driver.calls("fan_speed", 0) == 1
    assert inproc_driver.calls("pcie", 0) == 2
    assert inproc_driver.calls("field_values", 0) == 4  # the energy counter stays in the batch
    assert inproc_driver.calls("ecc", 0) == 0
    src.close()


def test_functions_missing_from_an_older_binding_are_unsupported(
    drv: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    for name in ("nvmlDeviceGetFanSpeed", "nvmlDeviceGetTemperatureV", "nvmlDeviceGetFieldValues"):
        monkeypatch.delattr(pynvml, name, raising=False)
    src = nvml.open_nvml(None, clock=Clock())
    (r, _) = src.read()
    assert r.fan_speed_pct is None and not r.lost
    assert r.temperature_c == 40.0
    # Without the batch API the same values come one call at a time.
    assert (r.ecc_corrected_volatile, r.ecc_uncorrected_volatile, r.energy_j) == (2, 0, 5000.0)
    assert drv.calls("ecc", 0) == 2
    src.close()


def test_functions_missing_from_the_driver_are_unsupported(drv: FakeDriver) -> None:
    """A driver without a symbol: the binding raises FunctionNotFound; asked once."""
    drv.set(gpu__0__field_values__error=FUNCTION_NOT_FOUND)
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        r, _ = src.read()
        assert (r.ecc_corrected_volatile, r.energy_j) == (2, 5000.0) and not r.lost
    assert drv.calls("field_values", 0) == 1
    assert drv.calls("ecc", 0) == 6
    src.close()


def test_batching_saves_calls(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    src.read()
    before = drv.gpu_calls(0)
    src.read()
    assert drv.calls("ecc", 0) == 0 and drv.calls("energy", 0) == 0
    # Remapped rows included, and the process list (no process running: no utilization call).
    assert drv.gpu_calls(0) - before == 15
    src.close()


def test_other_errors_cost_one_tick_and_are_logged_once(
    drv: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    drv.set(gpu__0__temperature__error=TIMEOUT)
    src = nvml.open_nvml(None, clock=Clock())
    caplog.set_level(logging.WARNING, logger="gputel.nvml")
    for _ in range(3):
        r, _ = src.read()
        assert r.temperature_c is None and not r.lost
        assert r.power_w == 300.0
    assert len(caplog.records) == 1
    assert "temperature" in caplog.records[0].getMessage()
    drv.set(gpu__0__temperature__error=None, gpu__0__temperature_c=55)
    r, _ = src.read()
    assert r.temperature_c == 55.0
    src.close()


def test_batched_value_with_a_transient_error(drv: FakeDriver) -> None:
    drv.set(gpu__0__ecc__error=TIMEOUT)
    src = nvml.open_nvml(None, clock=Clock())
    r, _ = src.read()
    assert r.ecc_corrected_volatile is None and r.ecc_uncorrected_volatile is None
    assert r.energy_j == 5000.0 and not r.lost
    drv.set(gpu__0__ecc__error=None, gpu__0__ecc__corrected=7)
    r, _ = src.read()
    assert r.ecc_corrected_volatile == 7
    src.close()


# ------------------------------------------------------------------------------------- energy
def test_energy_counter_gives_exact_deltas(drv: FakeDriver) -> None:
    drv.set(gpu__0__energy_mj=1_000_000)
    src = nvml.open_nvml(None, clock=Clock())
    (first, _) = src.read()
    assert src.read_energy_j()[0] == 1000.0
    drv.set(gpu__0__energy_mj=1_250_500)
    (second, _) = src.read()
    assert first.energy_j == 1000.0 and second.energy_j == 1250.5
    assert src.read_energy_j()[0] == 1250.5
    src.close()


def test_energy_integrates_power_where_the_counter_is_unsupported(drv: FakeDriver) -> None:
    drv.set(gpu__0__energy_mj=None, gpu__0__power_mw=100_000)
    clock = Clock(10.0)
    src = nvml.open_nvml(None, clock=clock)
    # The allocation path gets no integral: two samples minutes apart would invent the number.
    assert src.read_energy_j() == {0: None, 1: 5000.001}

    (r0, r1) = src.read()  # 100 W at t=10: the recorder's integral starts here, at 0
    assert r0.energy_j == 0.0
    assert r1.energy_j == 5000.001  # the counter where there is one

    clock.now = 11.0
    drv.set(gpu__0__power_mw=200_000)
    assert src.read()[0].energy_j == 150.0  # (100 + 200) / 2 W x 1 s

    clock.now = 13.0
    assert src.read()[0].energy_j == 550.0  # + 200 W x 2 s

    clock.now = 14.0
    drv.set(gpu__0__power__error=TIMEOUT)  # a missing power sample: energy unknown then
    assert src.read()[0].energy_j is None

    clock.now = 16.0
    drv.set(gpu__0__power__error=None, gpu__0__power_mw=100_000)
    power_calls = drv.calls("power", 0)
    assert src.read_energy_j() == {0: None, 1: 5000.001}
    assert drv.calls("power", 0) == power_calls  # no sample taken for it
    assert src.read()[0].energy_j == 550.0  # never bridges the gap 13 -> 16 s

    clock.now = 17.0
    assert src.read()[0].energy_j == 650.0  # + 100 W x 1 s
    assert src.read_energy_j()[0] is None
    assert drv.calls("energy", 0) == 1  # the single-call counter: unsupported, asked once
    src.close()


def test_allocation_energy_is_empty_without_a_counter(drv: FakeDriver) -> None:
    # The agent's source: only read_energy_j at allocate and release, never read().
    drv.set(gpu__0__energy_mj=None, gpu__0__power_mw=250_000)
    clock = Clock(0.0)
    src = nvml.open_nvml(None, clock=clock)
    at_allocate = src.read_energy_j()[0]
    clock.now = 600.0
    drv.set(gpu__0__power_mw=500_000)
    assert (at_allocate, src.read_energy_j()[0]) == (None, None)
    assert drv.calls("power", 0) == 0
    src.close()


def test_no_energy_without_counter_or_power(drv: FakeDriver) -> None:
    drv.set(gpu__0__energy_mj=None, gpu__0__power_mw=None)
    src = nvml.open_nvml(None, clock=Clock())
    r, _ = src.read()
    assert r.energy_j is None and r.power_w is None
    assert src.read_energy_j()[0] is None
    src.close()


# ------------------------------------------------------------------------------------ fallbacks
def test_memory_prefers_v2_which_leaves_out_the_drivers_reservation(drv: FakeDriver) -> None:
    drv.set(gpu__0__memory__used_bytes=1024**3, gpu__0__memory__reserved_bytes=512 * MIB)
    src = nvml.open_nvml(None, clock=Clock())
    r, _ = src.read()
    assert (r.memory_used_mib, r.memory_total_mib) == (1024.0, 81920.0)
    src.close()


@pytest.mark.parametrize("code", [FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH, 3])
def test_memory_falls_back_to_v1(drv: FakeDriver, code: int) -> None:
    """v1 counts the reservation as used: the fallback is visible in the value."""
    drv.set(gpu__0__memory__used_bytes=3 * MIB, gpu__0__memory__reserved_bytes=MIB)
    drv.set(gpu__0__memory__total_bytes=16 * MIB, gpu__0__memory_v2__error=code)
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        r, _ = src.read()
        assert (r.memory_used_mib, r.memory_total_mib) == (4.0, 16.0)
    src.close()


def test_memory_without_v2_in_the_binding(drv: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> None:
    import pynvml

    monkeypatch.delattr(pynvml, "nvmlMemory_v2")
    drv.set(gpu__0__memory__used_bytes=3 * MIB, gpu__0__memory__reserved_bytes=MIB)
    src = nvml.open_nvml(None, clock=Clock())
    r, _ = src.read()
    assert r.memory_used_mib == 4.0
    src.close()


def test_clock_event_reasons_fall_back_to_throttle_reasons(
    drv: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    monkeypatch.delattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons")
    drv.set(gpu__0__clock_reasons=0x40)
    src = nvml.open_nvml(None, clock=Clock())
    for _ in range(3):
        r, _ = src.read()
        assert r.clock_event_reasons == 0x40
    assert drv.calls("clock_reasons", 0) == 3
    src.close()


def test_temperature_falls_back_to_the_legacy_call(
    drv: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    monkeypatch.delattr(pynvml, "nvmlDeviceGetTemperatureV", raising=False)
    drv.set(gpu__0__temperature_c=61)
    src = nvml.open_nvml(None, clock=Clock())
    assert [src.read()[0].temperature_c for _ in range(2)] == [61.0, 61.0]
    src.close()


# --------------------------------------------------------------------------------- start-up
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (18, "reload the nvidia kernel module"),
        (NO_PERMISSION, "/dev/nvidia*"),
        (9, "driver is not loaded"),
        (UNKNOWN, "NVML could not start (Unknown Error)"),
    ],
)
def test_init_failures_are_one_classified_line(
    inproc_driver: FakeDriver, code: int, expected: str
) -> None:
    inproc_driver.set(init__error=code)
    with pytest.raises(GpuSourceError) as info:
        nvml.open_nvml(None)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    if "not loaded" in expected:
        assert "GPUTEL_BACKEND=sim/none" in message


def test_no_gpu_is_an_error_and_releases_nvml(inproc_driver: FakeDriver) -> None:
    inproc_driver.write({"device_count": 0})
    with pytest.raises(GpuSourceError, match="no NVIDIA GPU"):
        nvml.open_nvml(None)
    import pynvml

    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()


def test_missing_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuSourceError, match="install nvidia-ml-py"):
        nvml.open_nvml(None)


def test_selecting_a_missing_index(drv: FakeDriver) -> None:
    with pytest.raises(GpuSourceError) as info:
        nvml.open_nvml((1, 2, 5))
    message = str(info.value)
    assert "GPU 2, 5" in message and "2 GPU(s)" in message and "GPUTEL_GPUS" in message


def test_init_is_process_wide_and_close_is_idempotent(drv: FakeDriver) -> None:
    import pynvml

    a = nvml.open_nvml(None)
    b = nvml.open_nvml((0,))
    a.close()
    a.close()
    assert b.read()[0].power_w == 300.0  # NVML still up for b
    b.close()
    b.close()
    with pytest.raises(pynvml.NVMLError_Uninitialized):
        pynvml.nvmlDeviceGetCount()
    c = nvml.open_nvml(None)  # a later source starts NVML again
    assert c.read_utilization() == {0: 50.0, 1: 51.0}
    c.close()


def test_library_not_found_is_the_documented_line(fake_driver: FakeDriver) -> None:
    """A process whose loader finds no libnvidia-ml.so.1 at all (no LD_LIBRARY_PATH to it)."""
    env = {k: v for k, v in fake_driver.env().items() if k != "LD_LIBRARY_PATH"}
    code = (
        "from gputel.sources import nvml\n"
        "try:\n"
        "    nvml.open_nvml(None)\n"
        "except Exception as e:\n"
        "    print(e)\n"
    )
    import subprocess

    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    if "not found" not in out:
        pytest.skip("this machine has a real libnvidia-ml.so.1")
    assert out.startswith("NVIDIA driver library libnvidia-ml.so.1 not found")
