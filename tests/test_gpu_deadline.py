"""The recorder's per-GPU read deadline: a hung GPU is empty and 'stuck', the others read."""

from __future__ import annotations

import threading
import time
from dataclasses import fields

import pytest

from fakedriver import FakeDriver, scenario
from gputel.schema import GpuReading
from gputel.sources import nvml
from gputel.sources.base import GpuIdentity
from gputel.telemetry.gpu_deadline import DeadlineGpuSource, with_read_deadline
from gputel.telemetry.sampler import Sampler


class TwoGpus:
    """GPU 0 blocks while ``release`` is clear; GPU 1 always answers."""

    name = "nvml"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.release.set()
        self.reads = {0: 0, 1: 0}

    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(0, "GPU-0", "g"), GpuIdentity(1, "GPU-1", "g")]

    def read_gpu(self, index: int) -> GpuReading:
        self.reads[index] += 1
        if index == 0:
            self.release.wait()
        return GpuReading(index, f"GPU-{index}", "g", temperature_c=40.0 + index)

    def read(self) -> list[GpuReading]:
        return [self.read_gpu(0), self.read_gpu(1)]

    def read_utilization(self) -> dict[int, float | None]:
        return {0: 1.0, 1: 2.0}

    def read_energy_j(self) -> dict[int, float | None]:
        return {0: None, 1: None}

    def close(self) -> None:
        self.release.set()


def test_a_hung_gpu_is_stuck_until_its_call_returns(caplog: pytest.LogCaptureFixture) -> None:
    inner = TwoGpus()
    src = DeadlineGpuSource(inner, deadline_s=0.2)
    assert [r.temperature_c for r in src.read()] == [40.0, 41.0]
    inner.release.clear()
    for _ in range(3):
        r0, r1 = src.read()
        assert r0.stuck and r0.temperature_c is None and not r0.lost and r0.uuid == "GPU-0"
        assert not r1.stuck and r1.temperature_c == 41.0
    assert src.stuck == [0]
    assert inner.reads[0] == 2  # no read piled up behind the hung one
    assert len([r for r in caplog.records if "did not return" in r.getMessage()]) == 1
    inner.release.set()
    deadline = time.monotonic() + 10
    while src.readers.stuck and time.monotonic() < deadline:
        time.sleep(0.01)  # the hung call returning, on its own thread
    first = src.read()[0]  # the late result belongs to a past tick; this tick reads afresh
    assert not first.stuck and first.temperature_c == 40.0
    assert src.stuck == []
    src.close()


def test_only_sources_that_read_one_gpu_are_wrapped() -> None:
    inner = TwoGpus()
    wrapped = with_read_deadline(inner, 1.0)
    assert isinstance(wrapped, DeadlineGpuSource) and wrapped.deadline_s == 0.5
    assert with_read_deadline(inner, 4.0).deadline_s == 2.0  # type: ignore[attr-defined]

    class Whole:
        name = "sim"

        def devices(self) -> list[GpuIdentity]:
            return [GpuIdentity(0, "u", "n")]

    whole = Whole()
    assert with_read_deadline(whole, 1.0) is whole  # type: ignore[arg-type]


# ------------------------------------------------- one GPU's exception, over the real binding
def _filled(r: GpuReading) -> set[str]:
    return {f.name for f in fields(r) if getattr(r, f.name) not in (None, False, {}, ())}


@pytest.mark.parametrize("error", ["nvml", "python"])
def test_an_exception_on_one_gpu_leaves_the_others_row_whole(
    inproc_driver: FakeDriver, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A read of GPU 1 that raises (an NVML error the source did not turn into values, or any
    Python exception) empties GPU 1's row for that tick; GPU 0's row is whole."""
    inproc_driver.write(scenario(2))
    source = nvml.open_nvml(None)
    try:
        source.read()  # the first read finds out what the GPUs support
        healthy = source.read()
        import pynvml  # the binding the source loaded over the fake driver

        fault = pynvml.NVMLError(999) if error == "nvml" else ValueError("garbled")
        read_gpu = source.read_gpu
        failing = {1}

        def faulty(index: int) -> GpuReading:
            reading = read_gpu(index)
            if index in failing:
                raise fault
            return reading

        source.read_gpu = faulty  # type: ignore[method-assign]
        sampler = Sampler(with_read_deadline(source, 1.0))
        for _ in range(2):
            r0, r1 = sampler.sample().gpus
            assert r0.temperature_c == 31.0 and r0.power_w == 69.5 and not r0.stuck
            assert _filled(r0) >= _filled(healthy[0])  # every value GPU 0 gives when alone
            assert (r1.index, r1.uuid, r1.temperature_c, r1.stuck) == (
                1,
                healthy[1].uuid,
                None,
                False,
            )
        failed = [r for r in caplog.records if "its read failed" in r.getMessage()]
        assert len(failed) == 1 and "GPU 1" in failed[0].getMessage()  # once, not every tick
        failing.clear()
        assert sampler.sample().gpus[1].temperature_c == 31.0
    finally:
        source.close()


def test_a_gpu_over_its_budget_is_stuck_while_the_others_rows_come_every_tick(
    inproc_driver: FakeDriver,
) -> None:
    """Over the real binding: GPU 1's temperature call hangs in the driver. Every tick GPU 0
    and GPU 2 give whole rows, GPU 1 an empty 'stuck' one, and GPU 1 is not asked again until
    its call returns."""
    inproc_driver.write(scenario(3))
    source = nvml.open_nvml(None)
    src = DeadlineGpuSource(source, deadline_s=0.2)
    try:
        assert [r.temperature_c for r in src.read()] == [31.0, 31.0, 31.0]
        inproc_driver.set(gpu__1__temperature__sleep_ms=120_000)
        for _ in range(5):
            r0, r1, r2 = src.read()
            assert r0.temperature_c == r2.temperature_c == 31.0 and not (r0.stuck or r2.stuck)
            assert r1.stuck and r1.temperature_c is None and r1.power_w is None
        assert src.stuck == [1]
        assert inproc_driver.calls("temperature", 1) == 2  # the healthy read and the hung one
        assert inproc_driver.calls("temperature", 0) == 6
        inproc_driver.set(gpu__1__temperature__sleep_ms=None)
        deadline = time.monotonic() + 30
        while src.readers.stuck and time.monotonic() < deadline:
            time.sleep(0.01)
        r1 = src.read()[1]
        assert not r1.stuck and r1.temperature_c == 31.0 and src.stuck == []
    finally:
        src.close()
