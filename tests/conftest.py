"""Suite-wide test settings: marker handling and an environment free of the host's gputel config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fakedriver import driver_agents, fake_driver, fake_nvml_lib, gpu_driver, inproc_driver
from leftovers import _nothing_left_running

# Fixtures for every test module.
__all__ = [
    "_nothing_left_running",
    "driver_agents",
    "fake_driver",
    "fake_nvml_lib",
    "gpu_driver",
    "inproc_driver",
]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # GPU-marked tests run everywhere: on the real driver where there is a GPU, else on the
    # fake libnvidia-ml.so.1 (the gpu_driver fixture decides).
    is_root = os.geteuid() == 0
    for item in items:
        if "root" in item.keywords and not is_root:
            item.add_marker(pytest.mark.skip(reason="needs root"))


@pytest.fixture(autouse=True)
def _clean_gputel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests never see a GPUTEL_* or GPU_TELEMETRY_AUTOSTART value from the machine running them."""
    for name in list(os.environ):
        if name.startswith(("GPUTEL_", "_GPUTEL_")) or name == "GPU_TELEMETRY_AUTOSTART":
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private run directory that every gputel command in the test uses."""
    d = tmp_path / "run"
    d.mkdir(mode=0o750)
    monkeypatch.setenv("GPUTEL_RUN_DIR", str(d))
    return d
