"""GPM refused by the driver's profiling restriction (``RmProfilingAdminOnly: 1``, the default):
NVIDIA's real binding over the fake libnvidia-ml.so.1, whose GPM samples answer NO_PERMISSION to
a caller that is not an admin (``gpu.I.gpm.admin_only=1``, ``caller.admin=0``).

The refusal must be known at open, said once with the fix, and stand for the life of the source:
GPM columns empty, PCIe from the throughput calls, ``GPUTEL_ACTIVITY=sm`` from utilization, and
``gputel status`` naming the reason per GPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fakedriver import FakeDriver, gpu
from gputel.activity import activity_pct
from gputel.sources import nvml
from test_agent_e2e import AgentProc, wait_for
from test_nvml_gpm import GPM_ATTRS, Clock, gpm_gpu, world

RESTRICTED = "profiling counters are restricted to admin users (RmProfilingAdminOnly=1)"
PCIE = ("pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s")


def _params(root: Path, admin_only: int) -> Path:
    """A fake /proc with the driver's params file (the lines a 550 driver writes around it)."""
    params = root / "driver" / "nvidia" / "params"
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text(
        f"ResmanDebugLevel: 4294967295\nRmProfilingAdminOnly: {admin_only}\nEnableMSI: 1\n"
    )
    return root


@pytest.fixture
def refused(inproc_driver: FakeDriver) -> Iterator[FakeDriver]:
    """GPU 0 has GPM but restricts it to admins, and this caller is not one; GPU 1 is plain."""
    inproc_driver.write(
        {
            **world(gpm_gpu(0, gpm__admin_only=1), gpu(1, gpm__supported=0)),
            "caller.admin": 0,
        }
    )
    yield inproc_driver


def test_refused_gpm_leaves_gpm_empty_fills_pcie_and_falls_back(
    refused: FakeDriver, tmp_path: Path
) -> None:
    src = nvml.open_nvml(None, clock=Clock(), proc_root=_params(tmp_path / "proc", 1))
    try:
        (notice,) = [n for n in src.notices if "GPM" in n]
        assert "GPU 0:" in notice and RESTRICTED in notice
        assert "CAP_SYS_ADMIN" in notice and "NVreg_RestrictProfilingToAdminUsers=0" in notice
        gpm = src.devices()[0].gpm
        assert gpm is not None and gpm.startswith(f"refused: {RESTRICTED}; ")
        assert src.devices()[1].gpm == "not supported"
        asked = refused.calls("gpm", 0)
        for _ in range(3):
            r = src.read()[0]
            assert all(getattr(r, a) is None for a in GPM_ATTRS if a not in PCIE)
            # PCIe from the throughput calls (the scenario's 2000/1000 KB/s), not left empty.
            assert (r.pcie_rx_bytes_per_s, r.pcie_tx_bytes_per_s) == (2000 * 1024.0, 1000 * 1024.0)
            assert not r.has_gpm and r.field_errors == {} and not r.lost
            light = src.read_light()[0]
            assert not light.has_gpm and activity_pct(light, "sm") == 90.0  # utilization
        assert refused.calls("gpm", 0) == asked  # never asked again
    finally:
        src.close()


def test_without_the_params_file_the_refusal_names_the_answer(
    refused: FakeDriver, tmp_path: Path
) -> None:
    src = nvml.open_nvml(None, clock=Clock(), proc_root=tmp_path / "no-proc")
    try:
        gpm = src.devices()[0].gpm
        assert gpm is not None and gpm.startswith("refused: the driver answers NO_PERMISSION")
        assert RESTRICTED not in gpm
    finally:
        src.close()


def test_an_admin_caller_gets_gpm_despite_the_restriction(
    refused: FakeDriver, tmp_path: Path
) -> None:
    refused.set({"caller.admin": 1})
    src = nvml.open_nvml(None, clock=Clock(), proc_root=_params(tmp_path / "proc", 1))
    try:
        assert not [n for n in src.notices if "GPM" in n]
        assert src.devices()[0].gpm == "available"
        src.read()
        assert src.read()[0].sm_active_pct == 61.5
    finally:
        src.close()


def test_a_refusal_after_open_is_said_once_and_stands(
    refused: FakeDriver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The restriction switched on under a running source (a driver reloaded with it)."""
    refused.set({"caller.admin": 1})
    src = nvml.open_nvml(None, clock=Clock(), proc_root=_params(tmp_path / "proc", 1))
    try:
        src.read()
        refused.set({"caller.admin": 0})
        caplog.set_level("WARNING", logger="gputel.nvml")
        for _ in range(3):
            r = src.read()[0]
            assert r.sm_active_pct is None and r.pcie_rx_bytes_per_s is not None
        assert len([m for m in caplog.messages if "refused" in m]) == 1
        assert r.pcie_rx_bytes_per_s == 2000 * 1024.0 and r.field_errors == {}
    finally:
        src.close()


# ------------------------------------------------------------------------------ end to end
def test_status_says_why_and_sm_activity_falls_back_to_utilization(
    fake_driver: FakeDriver,
    driver_agents: Callable[..., AgentProc],
    tmp_path: Path,
) -> None:
    """The agent under GPUTEL_ACTIVITY=sm on a node whose driver refuses GPM: GPU 0's busy
    utilization starts telemetry, status says why per GPU, the recorder's rows have PCIe."""
    fake_driver.set(
        {
            "gpu.0.gpm.admin_only": 1,
            "gpu.0.gpm.2": 1.0,  # would read idle if GPM were used
            "gpu.1.gpm.supported": 0,
            "caller.admin": 0,
        }
    )
    proc = _params(tmp_path / "proc", 1)
    agent = driver_agents(GPUTEL_ACTIVITY="sm", GPUTEL_PROC_ROOT=str(proc))
    status = wait_for(lambda: (s := agent.try_status()) and s, 20, "agent status")
    gpm = status["gpus"][0]["gpm"]
    assert gpm.startswith(f"refused: {RESTRICTED}; ") and "CAP_SYS_ADMIN" in gpm
    assert status["gpus"][1]["gpm"] == "not supported"
    assert RESTRICTED in (status["notice"] or "")
    fake_driver.set({"gpu.0.utilization.gpu_pct": 95})
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on from utilization")
    assert agent.status()["gpus"][0]["activity_pct"] == 95.0
    from test_driver_e2e import _gpu_rows

    rows = wait_for(lambda: (r := _gpu_rows(agent.log_dir, 0)) and len(r) >= 3 and r, 20, "rows")
    assert all(r["sm_active_pct"] == "" for r in rows)
    assert rows[-1]["pcie_rx_bytes_per_s"] == str(2000 * 1024)
    assert agent.terminate() == 0


def test_local_status_json_names_the_refusal(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.set({"gpu.0.gpm.admin_only": 1, "caller.admin": 0})
    proc = _params(tmp_path / "proc", 1)
    result = fake_driver.run_gputel(
        "status",
        "--json",
        env={
            "GPUTEL_BACKEND": "nvml",
            "GPUTEL_PROC_ROOT": str(proc),
            "GPUTEL_RUN_DIR": str(tmp_path / "run"),
            "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        },
    )
    status = json.loads(result.stdout)
    assert status["gpus"][0]["gpm"].startswith(f"refused: {RESTRICTED}; ")
    assert status["gpus"][1]["gpm"] == "available"
