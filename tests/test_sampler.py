"""The sampler times each source, lets each fail alone, and logs an error once, not every tick."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Any

import pytest

from gputel.schema import GpuReading
from gputel.sources.base import GpuIdentity
from gputel.telemetry.sampler import Sampler

T0 = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)


class FakeGpu:
    name = "sim"

    def __init__(self, n: int = 2) -> None:
        self.n = n
        self.fail: Exception | None = None

    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(i, f"GPU-{i}", "Fake") for i in range(self.n)]

    def read_utilization(self) -> dict[int, float | None]:
        return {i: 50.0 for i in range(self.n)}

    def read(self) -> list[GpuReading]:
        if self.fail:
            raise self.fail
        return [GpuReading(i, f"GPU-{i}", "Fake", utilization_gpu_pct=50.0) for i in range(self.n)]

    def read_energy_j(self) -> dict[int, float | None]:
        return {}

    def close(self) -> None:
        pass


class FakeHost:
    def __init__(self, name: str, values: dict[str, Any]) -> None:
        self.name = name
        self.values = values
        self.fail: Exception | None = None

    def read(self) -> dict[str, Any]:
        if self.fail:
            raise self.fail
        return dict(self.values)


class StepTimer:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 0.001
        return self.t


def make(gpu: FakeGpu, hosts: list[FakeHost]) -> Sampler:
    return Sampler(gpu, hosts, clock=lambda: 42.0, wallclock=lambda: T0, timer=StepTimer())


def test_one_sample_with_every_source_status() -> None:
    host = FakeHost("host", {"cpu_util_pct": 12.5, "load_1m": 0.5})
    rapl = FakeHost("rapl", {"cpu_package_power_w": None})
    s = make(FakeGpu(2), [host, rapl]).sample(("a",), {0: ("a",)})
    assert s.timestamp == T0 and s.monotonic == 42.0
    assert [g.index for g in s.gpus] == [0, 1]
    assert s.host.cpu_util_pct == 12.5 and s.host.cpu_package_power_w is None
    assert [(st.name, st.up) for st in s.sources] == [("sim", True), ("host", True), ("rapl", True)]
    assert all(st.duration_s == pytest.approx(0.001) for st in s.sources)
    assert s.allocations == ("a",) and s.gpu_allocations == {0: ("a",)}


def test_a_failing_host_source_costs_only_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost("host", {"cpu_util_pct": 12.5})
    rapl = FakeHost("rapl", {"cpu_package_power_w": 40.0})
    rapl.fail = PermissionError("/sys/class/powercap/intel-rapl:0/energy_uj: Permission denied")
    sampler = make(FakeGpu(1), [host, rapl])
    with caplog.at_level(logging.WARNING, "gputel.telemetry.sampler"):
        for _ in range(5):
            s = sampler.sample()
    assert s.host.cpu_util_pct == 12.5
    assert s.host.cpu_package_power_w is None
    rapl_status = s.sources[2]
    assert not rapl_status.up and "Permission denied" in (rapl_status.error or "")
    assert len([r for r in caplog.records if "rapl" in r.getMessage()]) == 1


def test_failing_gpu_read_keeps_one_empty_row_per_gpu(caplog: pytest.LogCaptureFixture) -> None:
    gpu = FakeGpu(2)
    sampler = make(gpu, [])
    gpu.fail = RuntimeError("driver wedged")
    with caplog.at_level(logging.INFO, "gputel.telemetry.sampler"):
        s = sampler.sample()
        sampler.sample()
        gpu.fail = None
        ok = sampler.sample()
    assert [g.index for g in s.gpus] == [0, 1]
    assert all(g.utilization_gpu_pct is None for g in s.gpus)
    assert not s.sources[0].up
    assert ok.sources[0].up and ok.gpus[0].utilization_gpu_pct == 50.0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("driver wedged" in m for m in messages) == 1
    assert sum("reading again" in m for m in messages) == 1


def test_distinct_errors_are_each_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    host = FakeHost("hwmon", {})
    sampler = make(FakeGpu(0), [host])
    with caplog.at_level(logging.WARNING, "gputel.telemetry.sampler"):
        for msg in ["a", "b", "a", "b", "a"]:
            host.fail = OSError(msg)
            sampler.sample()
    assert len(caplog.records) == 2


def test_unknown_host_field_is_ignored_and_source_stays_up() -> None:
    host = FakeHost("host", {"bogus": 1, "load_1m": 1.0})
    s = make(FakeGpu(0), [host]).sample()
    assert s.sources[1].up and s.host.load_1m == 1.0
