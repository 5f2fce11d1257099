"""GPM through NVIDIA's real binding over the fake libnvidia-ml.so.1, in this process.

The values of the scenario must come out in the reading's units, empty (never 0) on the first
read, on a GPU without GPM and for a metric the driver does not give; PCIe comes from GPM
instead of the ~20 ms throughput calls; a MIG GPU's activity is its busiest GPU instance.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakedriver import MIB, FakeDriver, gpu
from gputel.activity import activity_pct
from gputel.sources import nvml
from gputel.sources.nvml_gpm import GPM_METRICS

#: The scenario's GPM values per metric id and what the reading must hold.
GPM_VALUES = {
    2: 61.5,  # SM activity
    3: 33.25,  # SM occupancy
    5: 40.0,  # any tensor
    10: 72.5,  # DRAM bandwidth
    11: 0.5,  # FP64
    12: 12.0,  # FP32
    13: 3.0,  # FP16
    20: 100.0,  # PCIe TX MiB/s
    21: 250.0,  # PCIe RX MiB/s
    60: 1024.0,  # NVLink RX MiB/s
    61: 512.0,  # NVLink TX MiB/s
}
EXPECTED = {
    "sm_active_pct": 61.5,
    "sm_occupancy_pct": 33.25,
    "tensor_active_pct": 40.0,
    "dram_active_pct": 72.5,
    "fp64_active_pct": 0.5,
    "fp32_active_pct": 12.0,
    "fp16_active_pct": 3.0,
    "pcie_tx_bytes_per_s": 100.0 * MIB,
    "pcie_rx_bytes_per_s": 250.0 * MIB,
    "nvlink_rx_bytes_per_s": 1024.0 * MIB,
    "nvlink_tx_bytes_per_s": 512.0 * MIB,
}
GPM_ATTRS = [attr for attr, _const, _factor in GPM_METRICS]


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gpm_gpu(index: int, **overrides: object) -> dict[str, object]:
    values: dict[str, object] = {f"gpm__{k}": v for k, v in GPM_VALUES.items()}
    values["utilization__gpu_pct"] = 90
    values.update(overrides)
    return gpu(index, **values)


def world(*gpus: dict[str, object]) -> dict[str, object]:
    values: dict[str, object] = {"device_count": len(gpus)}
    for g in gpus:
        values.update(g)
    return values


def mig_gpu(index: int) -> dict[str, object]:
    """A MIG GPU with three MIG devices: GPU instance 1 (two compute instances) and 2."""
    values: dict[str, object] = {
        "mig__mode": 1,
        "mig__max_count": 7,
        "utilization__gpu_pct": None,
        "utilization__memory_pct": None,
    }
    for j, (gi, ci) in enumerate([(1, 0), (1, 1), (2, 0)]):
        values[f"mig__{j}__gi"] = gi
        values[f"mig__{j}__ci"] = ci
        values[f"mig__{j}__uuid"] = f"MIG-{index}-{j}"
        values[f"mig__{j}__memory__total_bytes"] = 20 * 1024 * MIB
        values[f"mig__{j}__memory__used_bytes"] = (j + 1) * 1024 * MIB
    values["mig__1__gpm__2"] = 15.0
    values["mig__2__gpm__2"] = 80.0
    return gpu(index, **values)


@pytest.fixture
def drv(inproc_driver: FakeDriver) -> Iterator[FakeDriver]:
    inproc_driver.write(world(gpm_gpu(0), gpu(1, gpm__supported=0, pcie__rx_kbps=8)))
    yield inproc_driver


def test_values_come_from_the_pair_and_the_first_read_is_empty(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    first = src.read()[0]
    assert all(getattr(first, a) is None for a in GPM_ATTRS)
    second, no_gpm = src.read()
    assert {a: getattr(second, a) for a in GPM_ATTRS} == EXPECTED
    assert all(type(getattr(second, a)) is float for a in GPM_ATTRS)
    # PCIe from GPM: the ~20 ms throughput calls are never made on the GPM GPU.
    assert drv.calls("pcie", 0) == 0
    # The GPU without GPM: empty GPM fields, PCIe from the throughput calls.
    assert all(getattr(no_gpm, a) is None for a in GPM_ATTRS if not a.startswith("pcie"))
    assert no_gpm.pcie_rx_bytes_per_s == 8 * 1024.0
    assert drv.calls("pcie", 1) == 4
    gpm_calls = drv.calls("gpm", 1)
    src.read()
    assert drv.calls("gpm", 1) == gpm_calls == 1  # the support query, once
    assert drv.calls("gpm", 0) == 1 + 1 + 3  # the query, the probe at open, one sample per read
    src.close()


def test_a_metric_the_driver_lacks_is_empty_and_not_asked_again(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world(gpm_gpu(0, gpm__61=None, gpm__20=None)))
    src = nvml.open_nvml(None, clock=Clock())
    src.read()
    r = src.read()[0]
    assert r.nvlink_tx_bytes_per_s is None and r.sm_active_pct == 61.5
    # Without GPM's PCIe TX, both PCIe values come from the throughput calls, from this read on.
    assert r.pcie_tx_bytes_per_s == 1000 * 1024.0 and r.pcie_rx_bytes_per_s == 2000 * 1024.0
    assert inproc_driver.calls("pcie", 0) == 2
    inproc_driver.set(gpu__0__gpm__61=7.0)
    r = src.read()[0]
    assert r.nvlink_tx_bytes_per_s is None  # unsupported: not asked again
    assert r.pcie_tx_bytes_per_s == 1000 * 1024.0 and inproc_driver.calls("pcie", 0) == 4
    assert r.field_errors == {}
    src.close()


def test_light_reads_keep_their_own_pair_and_give_sm_activity(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    light = src.read_light()
    assert light[0].sm_active_pct is None and light[0].utilization_gpu_pct == 90.0
    # Under ``sm`` a GPM GPU without its pair yet is unknown, not judged by its utilization.
    assert light[0].has_gpm and activity_pct(light[0], "sm") is None
    assert not light[1].has_gpm
    light = src.read_light()
    assert light[0].sm_active_pct == 61.5 and light[1].sm_active_pct is None
    assert light[0].tensor_active_pct is None  # not a light field
    assert activity_pct(light[0], "sm") == 61.5
    assert activity_pct(light[0], "utilization") == 90.0
    assert activity_pct(light[1], "sm") == 0.0  # no GPM: its utilization
    drv.set(gpu__0__gpm__2=5.0)
    assert src.read_light()[0].sm_active_pct == 5.0
    src.close()


def test_a_failed_sample_is_empty_for_that_read_only(drv: FakeDriver) -> None:
    src = nvml.open_nvml(None, clock=Clock())
    src.read()
    drv.set(gpu__0__gpm__error=999)
    r = src.read()[0]
    assert r.sm_active_pct is None and r.power_w is not None and not r.lost
    drv.set(gpu__0__gpm__error=None)
    assert src.read()[0].sm_active_pct == 61.5  # paired with the last good sample
    src.close()


def test_a_mig_gpu_is_as_busy_as_its_busiest_instance(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world(mig_gpu(0), gpm_gpu(1)))
    src = nvml.open_nvml(None, clock=Clock())
    assert src.notices == []  # its activity is measured: no "cannot be measured" notice
    assert src.read_utilization() == {0: None, 1: 90.0}  # first sample: no pair yet
    assert src.read_utilization() == {0: 80.0, 1: 90.0}
    inproc_driver.set(gpu__0__mig__2__gpm__2=2.0)
    assert src.read_utilization()[0] == 15.0
    r0 = src.read()[0]
    assert r0.utilization_gpu_pct is None and r0.sm_active_pct is None
    assert [(m.gi, m.ci, m.mig_uuid) for m in r0.mig] == [
        (1, 0, "MIG-0-0"),
        (1, 1, "MIG-0-1"),
        (2, 0, "MIG-0-2"),
    ]
    assert [m.sm_active_pct for m in r0.mig] == [15.0, 15.0, 2.0]
    assert [m.memory_used_mib for m in r0.mig] == [1024.0, 2048.0, 3072.0]
    assert {m.memory_total_mib for m in r0.mig} == {20480.0}
    assert activity_pct(r0, "utilization") == 15.0
    light = src.read_light()[0]
    assert [m.sm_active_pct for m in light.mig] == [15.0, 15.0, 2.0]
    assert all(m.memory_used_mib is None for m in light.mig)
    assert inproc_driver.calls("utilization", 0) == 0
    src.close()


def test_a_mig_gpu_without_gpm_keeps_the_notice(inproc_driver: FakeDriver) -> None:
    inproc_driver.write(world({**mig_gpu(0), "gpu.0.gpm.supported": 0}))
    src = nvml.open_nvml(None, clock=Clock())
    (notice,) = src.notices
    assert "activity cannot be measured" in notice
    assert src.read_utilization() == {0: None}
    assert src.read()[0].mig == ()
    src.close()
