"""GPM end to end: the real ``gputel record`` and ``gputel agent`` over NVIDIA's binding and the
fake libnvidia-ml.so.1 (subprocesses), both ends of the supported binding range.

The scenario's GPM values must reach the CSV and ``/metrics`` (empty on each recorder's first
row and on a GPU without GPM), a MIG GPU must start telemetry when one of its instances gets
busy, and ``GPUTEL_ACTIVITY=sm`` must start telemetry on SM activity and not on utilization.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fakedriver import MIB, FakeDriver
from test_agent_e2e import AgentProc, promtool_ok, wait_for
from test_driver_e2e import _gpu_rows, _rows, record_three_ticks

GPM = {2: 61.5, 3: 33.2, 5: 40.0, 10: 72.5, 11: 0.5, 12: 12.0, 13: 3.0, 20: 100, 21: 250, 60: 1024}
COLUMNS = {
    "sm_active_pct": "61.5",
    "sm_occupancy_pct": "33.2",
    "tensor_active_pct": "40.0",
    "dram_active_pct": "72.5",
    "fp64_active_pct": "0.5",
    "fp32_active_pct": "12.0",
    "fp16_active_pct": "3.0",
    "pcie_tx_bytes_per_s": str(100 * MIB),
    "pcie_rx_bytes_per_s": str(250 * MIB),
    "nvlink_rx_bytes_per_s": str(1024 * MIB),
    "nvlink_tx_bytes_per_s": "",  # the driver does not give this metric
}


def _gpm_world(driver: FakeDriver) -> None:
    driver.set({f"gpu.0.gpm.{k}": v for k, v in GPM.items()})
    driver.set(gpu__1__gpm__supported=0, gpu__0__utilization__gpu_pct=90)


def test_record_writes_gpm_values_and_leaves_the_first_row_empty(
    fake_driver: FakeDriver, tmp_path: Path
) -> None:
    _gpm_world(fake_driver)
    log_dir = record_three_ticks(fake_driver, tmp_path)
    first, *later = _gpu_rows(log_dir, 0)
    assert all(first[c] == "" for c in COLUMNS)  # no pair yet: empty, never 0
    for row in later:
        assert {c: row[c] for c in COLUMNS} == COLUMNS
        assert row["utilization_gpu_pct"] == "90.0"
    rows = _gpu_rows(log_dir, 1)
    for row in rows:  # no GPM: GPM columns empty, PCIe from the old calls (sampled apart)
        assert all(row[c] == "" for c in COLUMNS if not c.startswith("pcie"))
        assert row["pcie_rx_bytes_per_s"] in ("", str(2000 * 1024))
    assert rows[-1]["pcie_rx_bytes_per_s"] == str(2000 * 1024)
    assert not list(log_dir.glob("mig-*.csv"))


def test_gpm_metrics_under_the_agent(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    _gpm_world(fake_driver)
    agent = driver_agents()
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    text = wait_for(
        lambda: "gputel_gpu_sm_active_ratio{" in (t := agent.metrics()) and t, 20, "GPM series"
    )
    lines = {x.split("{")[0]: x for x in text.splitlines() if 'gpu="0"' in x}
    assert lines["gputel_gpu_sm_active_ratio"].endswith(" 0.615")
    assert lines["gputel_gpu_tensor_active_ratio"].endswith(" 0.4")
    assert lines["gputel_gpu_dram_active_ratio"].endswith(" 0.725")
    assert lines["gputel_gpu_nvlink_rx_bytes_per_second"].endswith(" 1.073741824e+09")
    assert "gputel_gpu_nvlink_tx_bytes_per_second" not in text
    assert 'gputel_gpu_sm_active_ratio{gpu="1"' not in text  # no GPM: no series
    promtool_ok(text)
    assert agent.terminate() == 0


def _mig_world(driver: FakeDriver) -> None:
    """GPU 0 in MIG mode with GPU instances 1 and 2 (both idle); GPU 1 idle, without GPM."""
    values: dict[str, object] = {
        "gpu.0.mig.mode": 1,
        "gpu.0.mig.max_count": 7,
        "gpu.0.utilization.gpu_pct": None,
        "gpu.0.mig.1.gpm.2": 1.0,
        "gpu.0.mig.2.gpm.2": 2.0,
        "gpu.1.gpm.supported": 0,
    }
    for j, gi in enumerate((1, 2)):
        values[f"gpu.0.mig.{j}.gi"] = gi
        values[f"gpu.0.mig.{j}.ci"] = 0
        values[f"gpu.0.mig.{j}.uuid"] = f"MIG-fake-{j}"
        values[f"gpu.0.mig.{j}.memory.total_bytes"] = 40 * 1024 * MIB
        values[f"gpu.0.mig.{j}.memory.used_bytes"] = (j + 1) * 1024 * MIB
    driver.set(values)


def test_a_busy_mig_instance_starts_telemetry(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    _mig_world(fake_driver)
    agent = driver_agents()
    status = agent.status()
    assert not status.get("notice")  # measured through its instances
    time.sleep(1.0)  # ten ticks at 0.1 s, start after 0.3 s: idle instances start nothing
    assert agent.status()["state"] == "idle"
    fake_driver.set({"gpu.0.mig.2.gpm.2": 85.0})
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    wait_for(lambda: len(_rows(agent.log_dir, "mig-*.csv")) >= 4, 20, "MIG rows")
    rows = _rows(agent.log_dir, "mig-*.csv")
    last = {r["gi"]: r for r in rows[-2:]}
    assert last["2"]["sm_active_pct"] == "85.0" and last["1"]["sm_active_pct"] == "1.0"
    assert last["2"]["mig_uuid"] == "MIG-fake-1" and last["2"]["ci"] == "0"
    assert last["1"]["memory_used_mib"] == "1024" and last["2"]["memory_total_mib"] == "40960"
    assert last["1"]["uuid"].startswith("GPU-fake-0000")
    assert _gpu_rows(agent.log_dir, 0)[-1]["utilization_gpu_pct"] == ""
    series = 'gputel_mig_sm_active_ratio{ci="0",gi="2",gpu="0",mig_uuid="MIG-fake-1"'
    # The recorder publishes its exposition about once a second at this interval.
    wait_for(lambda: series in agent.metrics(), 5, "MIG series")
    text = agent.metrics()
    promtool_ok(text)
    fake_driver.set({"gpu.0.mig.2.gpm.2": 3.0})
    wait_for(lambda: not agent.status()["telemetry_active"], 15, "telemetry off")
    assert agent.terminate() == 0


@pytest.mark.parametrize("pretrigger", ["30", "0"])
def test_activity_sm_starts_on_sm_activity_not_on_utilization(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, pretrigger: str
) -> None:
    """High utilization with idle SMs (a trickle of tiny kernels) stays idle under ``sm``; busy
    SMs start telemetry. With and without the pre-trigger (the agent's light read either way)."""
    fake_driver.set({"gpu.0.utilization.gpu_pct": 95, "gpu.0.gpm.2": 4.0, "gpu.1.gpm.supported": 0})
    agent = driver_agents(GPUTEL_ACTIVITY="sm", GPUTEL_PRETRIGGER_SECONDS=pretrigger)
    time.sleep(1.5)  # fifteen ticks at 0.1 s, start after 0.3 s
    assert agent.status()["state"] == "idle"
    assert not agent.transitions() or all(r["to_state"] != "arming" for r in agent.transitions())
    status = agent.status()
    assert status["activity"] == "sm"
    gpu0 = status["gpus"][0]
    assert (gpu0["utilization_gpu_pct"], gpu0["activity_pct"]) == (95.0, 4.0)
    fake_driver.set({"gpu.0.gpm.2": 70.0, "gpu.0.utilization.gpu_pct": 100})
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    # The recorder's own rows from its second on (its first has no GPM pair yet).
    wait_for(
        lambda: (r := _gpu_rows(agent.log_dir, 0)) and r[-1]["sm_active_pct"] == "70.0",
        20,
        "recorded SM activity",
    )
    head = [r for r in _gpu_rows(agent.log_dir, 0) if r["power_limit_w"] == ""]
    if pretrigger == "0":
        assert not head
    else:  # the pre-trigger rows carry the agent's SM activity
        assert head and {r["sm_active_pct"] for r in head} <= {"4.0", "70.0", ""}
        assert head[-1]["sm_active_pct"] == "70.0"
    # GPU 1 has no GPM: its utilization counts, and it starts telemetry too.
    fake_driver.set({"gpu.0.gpm.2": 1.0, "gpu.0.utilization.gpu_pct": 90})
    wait_for(lambda: not agent.status()["telemetry_active"], 15, "telemetry off")
    fake_driver.set({"gpu.1.utilization.gpu_pct": 60})
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on from GPU 1")
    assert agent.terminate() == 0


def test_a_bad_activity_setting_is_one_line_and_exit_2(fake_driver: FakeDriver) -> None:
    result = fake_driver.run_gputel("agent", env={"GPUTEL_ACTIVITY": "tensor"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "GPUTEL_ACTIVITY" in result.stderr
