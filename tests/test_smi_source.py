"""``GPUTEL_BACKEND=smi`` and ``auto``'s fallback, against a fake nvidia-smi with real shapes.

The fake ``tests/fakenvml/nvidia-smi`` reads the fake driver's scenario, so the same world is
seen through NVML and through nvidia-smi.
"""

from __future__ import annotations

import csv
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakedriver import GPU_IS_LOST, MIB, SCENARIO_ENV, SMI_DIR, UNKNOWN, FakeDriver, scenario
from gputel.settings import load_settings
from gputel.sources.base import GpuSelectionError, GpuSourceError
from gputel.sources.select import open_gpu_source
from gputel.sources.smi import SmiGpuSource, _bitmask, _number, _pstate, open_smi
from test_agent_e2e import wait_for


@pytest.fixture
def smi_world(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_nvml_lib: Path
) -> Iterator[FakeDriver]:
    """The fake nvidia-smi first on this process's PATH, over a two-GPU scenario."""
    driver = FakeDriver(fake_nvml_lib, tmp_path / "scenario.txt")
    driver.write(
        scenario(
            2,
            gpu__0__utilization__gpu_pct=45,
            gpu__0__memory__used_bytes=1234 * MIB,
            gpu__0__power_mw=69_520,
            gpu__1__fan_speed_pct=33,
            gpu__1__ecc__corrected=5,
        )
    )
    monkeypatch.setenv("PATH", f"{SMI_DIR}:/usr/bin:/bin")
    monkeypatch.setenv(SCENARIO_ENV, str(driver.path))
    yield driver


def test_placeholders_are_empty_values() -> None:
    for text in ("[N/A]", "[Not Supported]", "[Unknown Error]", "N/A", "", "[GPU requires reset]"):
        assert _number(text) is None
    assert _number(" 69.52") == 69.52
    assert _pstate("P8") == 8.0 and _pstate("[N/A]") is None and _pstate("P32") is None
    assert _bitmask("0x0000000000000004") == 4.0 and _bitmask("[N/A]") is None


def test_reads_the_same_fields_as_nvml(smi_world: FakeDriver) -> None:
    src = open_smi(None)
    assert src.name == "smi"
    assert [(d.index, d.name) for d in src.devices()] == [
        (0, "NVIDIA H100 80GB HBM3"),
        (1, "NVIDIA H100 80GB HBM3"),
    ]
    r0, r1 = src.read()
    assert r0.utilization_gpu_pct == 45.0 and r0.memory_used_mib == 1234.0
    assert r0.memory_total_mib == 81559.0 and r0.temperature_c == 31.0
    assert r0.power_w == 69.52 and r0.power_limit_w == 700.0
    assert r0.sm_clock_mhz == 345.0 and r0.memory_clock_mhz == 2619.0
    assert r0.performance_state == 0 and type(r0.performance_state) is int
    assert r0.clock_event_reasons == 1
    assert r0.fan_speed_pct is None  # [N/A]: no fan
    assert r1.fan_speed_pct == 33.0 and r1.ecc_corrected_volatile == 5
    # Not offered by nvidia-smi: always empty, never an estimate.
    assert r0.pcie_rx_bytes_per_s is None and r0.energy_j is None
    assert src.read_energy_j() == {0: None, 1: None}
    assert src.read_utilization() == {0: 45.0, 1: 0.0}


def test_an_unknown_error_cell_is_empty_and_a_missing_gpu_is_lost(smi_world: FakeDriver) -> None:
    src = open_smi(None)
    smi_world.set(gpu__1__fan_speed__error=UNKNOWN)
    r0, r1 = src.read()
    assert r1.fan_speed_pct is None and not r1.lost and r1.power_w == 69.5
    smi_world.set(gpu__1__all__error=GPU_IS_LOST)
    r0, r1 = src.read()
    assert r1.lost and r1.power_w is None and not r0.lost
    assert src.read_utilization() == {0: 45.0, 1: None}


def test_fields_an_older_nvidia_smi_lacks_fall_back(smi_world: FakeDriver) -> None:
    smi_world.set(smi__unknown_fields="clocks_event_reasons.active,power.draw.average")
    src = open_smi(None)
    r0, _ = src.read()
    assert r0.clock_event_reasons == 1 and r0.power_w == 69.52


def test_selection_mig_and_failures(smi_world: FakeDriver) -> None:
    assert [d.index for d in open_smi((1,)).devices()] == [1]
    with pytest.raises(GpuSelectionError, match="GPU 4"):
        open_smi((0, 4))
    smi_world.set(gpu__0__mig__mode=1)
    (notice,) = open_smi(None).notices
    assert "GPU 0" in notice and "MIG mode" in notice
    smi_world.set(init__error=9)
    with pytest.raises(GpuSourceError, match="couldn't communicate with the NVIDIA driver"):
        open_smi(None)


def test_a_hung_nvidia_smi_is_a_source_error(smi_world: FakeDriver) -> None:
    src = open_smi(None, timeout_s=0.5)
    assert isinstance(src, SmiGpuSource)
    smi_world.set(gpu__0__all__sleep_ms=5000)
    with pytest.raises(GpuSourceError, match=r"did not answer within 0\.5s"):
        src.read()


def test_no_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(GpuSourceError, match="nvidia-smi not found"):
        open_smi(None)


# ------------------------------------------------------------------------------------ selection
def test_backend_smi(smi_world: FakeDriver) -> None:
    source, notice = open_gpu_source(load_settings({"GPUTEL_BACKEND": "smi"}), env={})
    assert source.name == "smi" and notice is None


def _status(driver: FakeDriver, tmp_path: Path, backend: str) -> dict[str, object]:
    """``gputel status --json`` in a process whose loader finds no libnvidia-ml.so.1."""
    result = driver.run_gputel(
        "status",
        "--json",
        library=False,
        smi=True,
        env={"GPUTEL_BACKEND": backend, "GPUTEL_RUN_DIR": str(tmp_path)},
    )
    status: dict[str, object] = json.loads(result.stdout)
    if status.get("source") == "nvml":
        pytest.skip("this machine has a real libnvidia-ml.so.1")
    return status


def test_auto_falls_back_to_smi_when_the_binding_cannot_load_nvml(
    fake_driver: FakeDriver, tmp_path: Path
) -> None:
    status = _status(fake_driver, tmp_path, "auto")
    assert status["source"] == "smi"
    notice = str(status["notice"])
    assert notice.startswith("NVML unavailable (NVIDIA driver library libnvidia-ml.so.1 not found")
    assert "reading the GPUs through nvidia-smi instead" in notice
    assert [g["index"] for g in status["gpus"]] == [0, 1]  # type: ignore[attr-defined]


def test_auto_without_either_records_no_gpu(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.set(init__error=9)
    status = _status(fake_driver, tmp_path, "auto")
    assert status["source"] == "none" and status["gpus"] == []
    assert "libnvidia-ml.so.1 not found" in str(status["notice"])


# ---------------------------------------------------------------------------------- end to end
def test_record_with_the_smi_backend(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.set(gpu__0__utilization__gpu_pct=64, gpu__1__temperature_c=58)
    log_dir = tmp_path / "log"
    proc = fake_driver.popen_gputel(
        "record",
        library=False,
        smi=True,
        env={
            "GPUTEL_BACKEND": "auto",
            "GPUTEL_INTERVAL": "0.2",
            "GPUTEL_LOG_DIR": str(log_dir),
            "GPUTEL_EXPORTER_PORT": "0",
        },
    )

    def gpu_rows() -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        for path in sorted(log_dir.glob("gpu-*.csv")):
            with open(path, newline="") as fh:
                rows.extend(csv.DictReader(fh))
        return rows

    try:
        wait_for(lambda: len(gpu_rows()) >= 4, 30, "rows from the smi backend")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "reading the GPUs through nvidia-smi instead" in err
    rows = gpu_rows()
    r0 = next(r for r in reversed(rows) if r["gpu"] == "0")
    r1 = next(r for r in reversed(rows) if r["gpu"] == "1")
    assert float(r0["utilization_gpu_pct"]) == 64.0 and float(r1["temperature_c"]) == 58.0
    assert r0["fan_speed_pct"] == "" and r0["energy_j"] == ""


def test_status_json_with_the_smi_backend(fake_driver: FakeDriver, tmp_path: Path) -> None:
    result = fake_driver.run_gputel(
        "status",
        "--json",
        library=False,
        smi=True,
        env={"GPUTEL_BACKEND": "smi", "GPUTEL_RUN_DIR": str(tmp_path)},
    )
    status = json.loads(result.stdout)
    assert [g["index"] for g in status["gpus"]] == [0, 1]
    assert status["gpus"][0]["power_w"] == 69.5
