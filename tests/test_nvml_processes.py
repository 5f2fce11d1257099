"""GPU processes through NVIDIA's real binding over the fake driver (in this process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fakedriver import MIB, NOT_SUPPORTED, FakeDriver
from gputel.schema import GpuProcess
from gputel.sources import nvml


@pytest.fixture
def source(inproc_driver: FakeDriver) -> Iterator[nvml.NvmlGpuSource]:
    src = nvml.open_nvml(None)
    yield src
    src.close()


def test_processes_with_memory_and_sm_util(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource
) -> None:
    inproc_driver.set(
        {"gpu.0.processes": f"4242:{1024 * MIB}:40,4243:{512 * MIB}:7", "gpu.1.processes": ""}
    )
    gpu0, gpu1 = source.read()
    assert gpu0.processes == (
        GpuProcess(0, 4242, 1024.0, 40.0),
        GpuProcess(0, 4243, 512.0, 7.0),
    )
    assert gpu1.processes == ()
    # No process listed: the utilization call is not made at all.
    assert inproc_driver.calls("process_utilization", 1) == 0
    assert gpu0.field_errors == {} and not gpu0.lost


def test_no_new_sample_leaves_sm_empty_not_failed(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource
) -> None:
    """The legacy call answers NOT_FOUND when nothing ran since the timestamp: no value, no
    field error."""
    inproc_driver.set({"gpu.0.processes": f"7:{MIB}:50"})
    inproc_driver.set({"gpu.0.process_utilization.error": 6})
    (gpu0, _) = source.read()
    assert gpu0.processes == (GpuProcess(0, 7, 1.0, None),)
    assert "process_utilization" not in gpu0.field_errors


def test_falls_back_to_legacy_process_utilization(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    # The lowest supported binding has no nvmlDeviceGetProcessesUtilizationInfo at all.
    monkeypatch.delattr(pynvml, "nvmlDeviceGetProcessesUtilizationInfo", raising=False)
    inproc_driver.set({"gpu.0.processes": f"9:{2 * MIB}:33"})
    for _ in range(2):
        (gpu0, _) = source.read()
        assert gpu0.processes == (GpuProcess(0, 9, 2.0, 33.0),)
    assert gpu0.field_errors == {}


def test_unsupported_process_listing_is_not_asked_again(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource
) -> None:
    inproc_driver.set({"gpu.0.processes": f"9:{MIB}:1", "gpu.0.processes.error": NOT_SUPPORTED})
    (gpu0, _) = source.read()
    assert gpu0.processes is None
    before = inproc_driver.calls("processes", 0)
    source.read()
    assert inproc_driver.calls("processes", 0) == before


def test_a_failed_listing_costs_this_tick_only(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource
) -> None:
    inproc_driver.set({"gpu.0.processes": f"9:{MIB}:1", "gpu.0.processes.error": 999})
    (gpu0, _) = source.read()
    assert gpu0.processes is None and gpu0.field_errors == {"processes": 1}
    inproc_driver.set({"gpu.0.processes.error": None})
    (gpu0, _) = source.read()
    assert gpu0.processes == (GpuProcess(0, 9, 1.0, 1.0),)


def test_light_reads_do_not_list_processes(
    inproc_driver: FakeDriver, source: nvml.NvmlGpuSource
) -> None:
    inproc_driver.set({"gpu.0.processes": f"9:{MIB}:1"})
    source.read_light()
    source.read_utilization()
    assert inproc_driver.calls("processes", 0) == 0
