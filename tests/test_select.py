"""Backend selection: auto falls back with one clear line, sim inherits its epoch, nvml is lazy."""

from __future__ import annotations

import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from gputel.runtime import SIM_EPOCH_ENV
from gputel.settings import Settings, load_settings
from gputel.sources.base import GpuSourceError
from gputel.sources.select import (
    NVML_BINDINGS_MISSING,
    auto_fallback_notice,
    open_gpu_source,
    open_host_sources,
)
from gputel.sources.sim import NoneGpuSource, SimGpuSource

NVML_MODULE = "gputel.sources.nvml"


def fake_nvml(monkeypatch: pytest.MonkeyPatch, open_nvml: Callable[..., object]) -> list[object]:
    """Install a stand-in ``gputel.sources.nvml``; returns the list of ``selected`` it got."""
    calls: list[object] = []

    def recording_open(selected: tuple[int, ...] | None, **kwargs: object) -> object:
        calls.append(selected)
        return open_nvml(selected)

    module = types.ModuleType(NVML_MODULE)
    module.open_nvml = recording_open  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, NVML_MODULE, module)
    return calls


def fail(message: str) -> Callable[..., object]:
    def open_nvml(selected: object) -> object:
        raise GpuSourceError(message)

    return open_nvml


def settings(**env: str) -> Settings:
    return load_settings({f"GPUTEL_{k.upper()}": v for k, v in env.items()})


# ------------------------------------------------------------------------------------ auto
def test_auto_falls_back_to_none_with_the_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, fail("NVIDIA driver not loaded (nvidia-smi fails too): load nvidia"))
    source, notice = open_gpu_source(settings(), env={})
    assert isinstance(source, NoneGpuSource)
    assert notice == (
        "no GPU telemetry: NVIDIA driver not loaded (nvidia-smi fails too): load nvidia; "
        "recording host telemetry only (set GPUTEL_BACKEND=sim for simulated GPUs)"
    )


def test_auto_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, NVML_MODULE, None)
    source, notice = open_gpu_source(settings(backend="auto"), env={})
    assert isinstance(source, NoneGpuSource)
    assert notice == auto_fallback_notice(NVML_BINDINGS_MISSING)
    assert "pip install nvidia-ml-py" in notice


def test_auto_when_the_nvml_module_cannot_import_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.delitem(sys.modules, NVML_MODULE, raising=False)
    source, notice = open_gpu_source(settings(backend="auto"), env={})
    assert isinstance(source, NoneGpuSource)
    assert notice is not None
    assert notice.startswith("no GPU telemetry: ")
    assert notice.endswith("(set GPUTEL_BACKEND=sim for simulated GPUs)")
    assert "\n" not in notice


def test_auto_survives_an_unexpected_nvml_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(selected: object) -> object:
        raise RuntimeError("driver said something odd\nsecond line")

    fake_nvml(monkeypatch, boom)
    source, notice = open_gpu_source(settings(), env={})
    assert isinstance(source, NoneGpuSource)
    assert notice is not None and "RuntimeError: driver said something odd" in notice
    assert "\n" not in notice


def test_auto_uses_nvml_when_it_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    sentinel = object()
    calls = fake_nvml(monkeypatch, lambda selected: sentinel)
    source, notice = open_gpu_source(settings(gpus="0,2"), env={})
    assert source is sentinel
    assert notice is None
    assert calls == [(0, 2)]


# ------------------------------------------------------------------------------------ nvml
def test_explicit_nvml_error_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvml(monkeypatch, fail("GPU 3 is not present (2 GPUs: 0-1)"))
    with pytest.raises(GpuSourceError, match=r"GPU 3 is not present"):
        open_gpu_source(settings(backend="nvml"), env={})


def test_explicit_nvml_without_pynvml_is_a_source_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, NVML_MODULE, None)
    with pytest.raises(GpuSourceError, match=r"pip install nvidia-ml-py"):
        open_gpu_source(settings(backend="nvml"), env={})


# ------------------------------------------------------------------------------- sim, none
def test_none_backend() -> None:
    source, notice = open_gpu_source(settings(backend="none"), env={})
    assert isinstance(source, NoneGpuSource)
    assert notice is None


def test_sim_takes_its_epoch_from_the_environment() -> None:
    s = settings(backend="sim", sim_gpus="3", sim_pattern="0:5,80:20")
    source, notice = open_gpu_source(s, env={SIM_EPOCH_ENV: "1000.5"}, clock=lambda: 1010.5)
    assert isinstance(source, SimGpuSource)
    assert notice is None
    assert source.epoch == 1000.5
    assert source.read_utilization() == {0: 80.0, 1: 80.0, 2: 80.0}


def test_sim_without_epoch_starts_a_new_timeline() -> None:
    s = settings(backend="sim", sim_pattern="0:5,80:20")
    source, notice = open_gpu_source(s, env={}, clock=lambda: 42.0)
    assert isinstance(source, SimGpuSource)
    assert notice is None
    assert source.epoch == 42.0
    assert source.read_utilization() == {0: 0.0, 1: 0.0}


@pytest.mark.parametrize("value", ["junk", "nan", "inf", "-5", "2000", "1e400"])
def test_sim_ignores_an_unusable_epoch_with_a_notice(value: str) -> None:
    s = settings(backend="sim")
    source, notice = open_gpu_source(s, env={SIM_EPOCH_ENV: value}, clock=lambda: 1000.0)
    assert isinstance(source, SimGpuSource)
    assert source.epoch == 1000.0
    assert notice is not None and SIM_EPOCH_ENV in notice and "\n" not in notice


def test_sim_uses_process_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SIM_EPOCH_ENV, "1.25")
    source, _ = open_gpu_source(settings(backend="sim"))
    assert isinstance(source, SimGpuSource)
    assert source.epoch == 1.25


def test_sim_selection_of_a_missing_gpu_propagates() -> None:
    with pytest.raises(GpuSourceError, match=r"GPU 5"):
        open_gpu_source(settings(backend="sim", sim_gpus="2", gpus="0,5"), env={})


def test_sim_and_none_never_import_pynvml() -> None:
    code = (
        "import sys\n"
        "from gputel.settings import load_settings\n"
        "from gputel.sources.select import open_gpu_source\n"
        "for b in ('sim', 'none'):\n"
        "    open_gpu_source(load_settings({'GPUTEL_BACKEND': b}), env={})\n"
        "assert 'pynvml' not in sys.modules, 'pynvml imported'\n"
        "assert 'gputel.sources.nvml' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------------------ host
def test_host_sources(tmp_path: Path) -> None:
    """An empty sysfs root: procfs values are read, RAPL and hwmon give empty values."""
    sources = open_host_sources(settings(sysfs_root=str(tmp_path)))
    assert [s.name for s in sources] == ["host", "rapl", "hwmon"]
    host, rapl, hwmon = (source.read() for source in sources)
    assert host["memory_used_mib"] > 0 and host["memory_available_mib"] > 0
    assert host["load_1m"] >= 0
    assert host["cpu_util_pct"] is None  # no earlier reading to take a delta from
    assert set(host) >= {"net_rx_bytes", "disk_read_bytes", "swap_used_mib"}
    assert rapl == {"cpu_package_power_w": None, "cpu_package_energy_j": None, "dram_power_w": None}
    assert hwmon == {"hwmon_temperatures_c": {}, "cpu_temperature_c": None}


def test_auto_does_not_fall_back_when_a_selected_gpu_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wrong GPUTEL_GPUS on a GPU node is a configuration error, not 'no GPUs'."""
    from gputel.sources import select
    from gputel.sources.base import GpuSelectionError

    def missing(selected: object, **settings: object) -> object:
        raise GpuSelectionError("GPUTEL_GPUS selects GPU 7, but this node has 2 GPU(s)")

    fake = types.ModuleType("gputel.sources.nvml")
    fake.open_nvml = missing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gputel.sources.nvml", fake)
    with pytest.raises(GpuSelectionError, match="GPU 7"):
        select.open_gpu_source(load_settings({"GPUTEL_BACKEND": "auto", "GPUTEL_GPUS": "7"}))
