"""The NVML source on the driver: types, ranges, nvidia-smi.

``pytest -m gpu`` runs these on the real driver where ``nvidia-smi -L`` lists a GPU
(``scripts/gpu-check.sh``), and on the fake libnvidia-ml.so.1 everywhere else, so CI runs them
too.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import fields

import pytest

from gputel.schema import GPU_FIELDS, GpuReading
from gputel.sources import nvml
from gputel.sources.nvml import NvmlGpuSource

pytestmark = pytest.mark.gpu

_TYPES = {f.attr: f.type for f in GPU_FIELDS}


@pytest.fixture
def source(gpu_driver: str) -> Iterator[NvmlGpuSource]:
    src = nvml.open_nvml(None)
    yield src
    src.close()


def _smi(query: str) -> list[str] | None:
    """One CSV column per GPU from nvidia-smi, or None where it is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run(
        [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def test_every_gpu_reads_with_plausible_values(source: NvmlGpuSource) -> None:
    devices = source.devices()
    assert devices and [d.index for d in devices] == sorted(d.index for d in devices)
    readings = source.read()
    assert [r.index for r in readings] == [d.index for d in devices]
    for r in readings:
        assert isinstance(r, GpuReading) and not r.lost
        assert r.uuid.startswith(("GPU-", "MIG-")) and r.name
        for f in fields(r):
            value = getattr(r, f.name)
            if f.name in _TYPES and value is not None:
                assert isinstance(value, _TYPES[f.name]), (f.name, value)
        for pct in (r.utilization_gpu_pct, r.utilization_memory_pct, r.fan_speed_pct):
            assert pct is None or 0 <= pct <= 100
        assert r.temperature_c is not None and 0 <= r.temperature_c <= 120
        assert r.memory_total_mib is not None and r.memory_total_mib > 0
        assert r.memory_used_mib is not None and 0 <= r.memory_used_mib <= r.memory_total_mib
        assert r.power_w is None or r.power_w > 0
        assert r.power_limit_w is None or r.power_limit_w > 0
        assert r.energy_j is None or r.energy_j >= 0
        assert r.sm_clock_mhz is None or 0 <= r.sm_clock_mhz < 10_000
        assert r.performance_state is None or 0 <= r.performance_state <= 15
        for count in (r.ecc_corrected_volatile, r.ecc_uncorrected_volatile):
            assert count is None or count >= 0


def test_energy_never_decreases(source: NvmlGpuSource) -> None:
    first = source.read_energy_j()
    time.sleep(0.2)
    second = source.read_energy_j()
    assert first.keys() == second.keys()
    for index, before in first.items():
        after = second[index]
        if before is not None and after is not None:
            assert after >= before


def test_light_read_matches_the_full_read(source: NvmlGpuSource) -> None:
    light = source.read_utilization()
    assert set(light) == {d.index for d in source.devices()}
    assert all(v is None or 0 <= v <= 100 for v in light.values())


def test_identity_and_utilization_agree_with_nvidia_smi(source: NvmlGpuSource) -> None:
    rows = _smi("index,uuid,memory.total")
    if rows is None:
        pytest.skip("nvidia-smi is not installed")
    smi = {int(i): (uuid, float(total)) for i, uuid, total in (r.split(", ") for r in rows)}
    readings = {r.index: r for r in source.read()}
    for index, (uuid, total_mib) in smi.items():
        if index in readings:
            assert readings[index].uuid == uuid
            assert readings[index].memory_total_mib == pytest.approx(total_mib, rel=0.02)
    ours = source.read_utilization()
    theirs = _smi("utilization.gpu")
    assert theirs is not None
    for index, text in enumerate(theirs):
        if index in ours and ours[index] is not None and text.isdigit():
            # Both sample a moving counter moments apart; only a gross mismatch is a bug.
            assert abs(ours[index] - float(text)) <= 30, (index, ours[index], text)


def test_process_wide_init_survives_a_second_source(source: NvmlGpuSource) -> None:
    other = nvml.open_nvml((source.devices()[0].index,))
    other.close()
    assert source.read_utilization()
