"""The recorder's per-GPU read deadline: a hung GPU is empty and 'stuck', the others read."""

from __future__ import annotations

import threading
import time

import pytest

from gputel.schema import GpuReading
from gputel.sources.base import GpuIdentity
from gputel.telemetry.gpu_deadline import DeadlineGpuSource, with_read_deadline


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
    while src._readers[0].busy and time.monotonic() < deadline:
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
