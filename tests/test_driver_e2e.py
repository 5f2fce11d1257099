"""The real ``gputel`` commands over NVIDIA's binding and the fake libnvidia-ml.so.1.

Each test runs gputel in subprocesses whose pynvml loads the fake driver (``LD_LIBRARY_PATH``)
and changes the driver's world mid-run through the scenario file: utilization rises and falls, a
GPU is lost, a call hangs. Intervals and thresholds are short and margins several ticks wide, so
a loaded machine delays ticks without changing the outcome.
"""

from __future__ import annotations

import csv
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fakedriver import GPU_IS_LOST, UNKNOWN, FakeDriver, scenario
from test_agent_e2e import AgentProc, NotifyListener, promtool_ok, wait_for


def _rows(log_dir: Path, pattern: str) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted(log_dir.glob(pattern)):
        with open(path, newline="") as fh:
            out.extend(csv.DictReader(fh))
    return out


def _gpu_rows(log_dir: Path, gpu: int) -> list[dict[str, str]]:
    return [r for r in _rows(log_dir, "gpu-*.csv") if r["gpu"] == str(gpu)]


def record_three_ticks(fake_driver: FakeDriver, tmp_path: Path) -> Path:
    """Run ``gputel record`` over the fake driver until GPU 1 has three rows, stop it with
    SIGTERM (it must exit 0) and return its log directory."""
    log_dir = tmp_path / "log"
    proc = fake_driver.popen_gputel(
        "record",
        env={
            "GPUTEL_BACKEND": "nvml",
            "GPUTEL_INTERVAL": "0.1",
            "GPUTEL_LOG_DIR": str(log_dir),
            "GPUTEL_RUN_DIR": str(tmp_path / "run"),
            "GPUTEL_EXPORTER_PORT": "0",
        },
    )
    try:
        wait_for(lambda: len(_gpu_rows(log_dir, 1)) >= 3, 20, "three ticks of rows")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    return log_dir


# ---------------------------------------------------------------------------- status and record
def test_status_json_reads_the_driver(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.set(gpu__0__utilization__gpu_pct=37, gpu__1__temperature_c=66)
    result = fake_driver.run_gputel(
        "status", "--json", env={"GPUTEL_BACKEND": "nvml", "GPUTEL_RUN_DIR": str(tmp_path)}
    )
    assert result.returncode == 3 or result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    gpus = {g["index"]: g for g in status["gpus"]}
    assert gpus[0]["utilization_gpu_pct"] == 37.0
    assert gpus[1]["temperature_c"] == 66.0
    assert gpus[0]["name"] == "NVIDIA H100 80GB HBM3"
    assert gpus[0]["uuid"] == "GPU-fake-0000-0000-0000-0000-000000000000"


def test_record_writes_the_drivers_values(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.set(
        gpu__0__utilization__gpu_pct=42,
        gpu__0__memory__used_bytes=2048 * 2**20,
        gpu__0__power_mw=123_456,
        gpu__1__temperature_c=71,
    )
    log_dir = record_three_ticks(fake_driver, tmp_path)
    row0 = _gpu_rows(log_dir, 0)[-1]
    row1 = _gpu_rows(log_dir, 1)[-1]
    assert float(row0["utilization_gpu_pct"]) == 42.0
    assert float(row0["memory_used_mib"]) == 2048.0
    assert float(row0["memory_total_mib"]) == 81559.0
    assert row0["power_w"] == "123.46"  # watts to 0.01 (docs/csv.md)
    assert float(row1["temperature_c"]) == 71.0
    assert row0["fan_speed_pct"] == ""  # the H100 has no fan: unsupported, an empty cell
    assert row0["lost"] == "0" and row0["name"] == "NVIDIA H100 80GB HBM3"


# -------------------------------------------------------------------------- start-up failures
@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (9, "NVIDIA kernel driver is not loaded"),
        (18, "NVIDIA driver/library version mismatch"),
        (4, "no permission to use the NVIDIA devices"),
        (UNKNOWN, "NVML could not start (Unknown Error)"),
    ],
)
def test_each_init_failure_is_one_line(
    fake_driver: FakeDriver, tmp_path: Path, code: int, expected: str
) -> None:
    fake_driver.set(init__error=code)
    env = {"GPUTEL_BACKEND": "nvml", "GPUTEL_LOG_DIR": str(tmp_path), "GPUTEL_EXPORTER_PORT": "0"}
    result = fake_driver.run_gputel("record", env=env)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if expected in line]
    assert len(lines) == 1, result.stderr
    # auto keeps a node agent's host telemetry: the same reason, as a notice.
    auto = fake_driver.run_gputel(
        "status", "--json", env={"GPUTEL_BACKEND": "auto", "GPUTEL_RUN_DIR": str(tmp_path)}
    )
    assert expected in json.loads(auto.stdout)["notice"]


def test_a_refused_gpu_is_listed_as_unavailable(fake_driver: FakeDriver, tmp_path: Path) -> None:
    fake_driver.write(scenario(3, gpu__1__handle__error=4))
    result = fake_driver.run_gputel(
        "status", "--json", env={"GPUTEL_BACKEND": "nvml", "GPUTEL_RUN_DIR": str(tmp_path)}
    )
    status = json.loads(result.stdout)
    assert [g["index"] for g in status["gpus"]] == [0, 2]
    assert "GPU 1 is unavailable" in status["notice"]
    human = fake_driver.run_gputel(
        "status", env={"GPUTEL_BACKEND": "nvml", "GPUTEL_RUN_DIR": str(tmp_path)}
    )
    assert "GPU 1 is unavailable" in " ".join(human.stdout.split())


# ----------------------------------------------------------------------------------- the agent
def test_under_an_agent_the_refused_gpu_warning_is_logged_once(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    """The agent warns; its recorder child, which opens the same GPUs, does not say it again."""
    fake_driver.write(scenario(3, gpu__1__handle__error=4))
    agent = driver_agents()
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 2)) >= 2, 20, "the child recording")
    warnings = [
        line
        for line in agent.stderr().splitlines()
        if "GPU 1 is unavailable" in line and "WARNING" in line
    ]
    assert len(warnings) == 1, agent.stderr()
    assert agent.terminate() == 0


def test_agent_idle_active_idle_over_the_driver(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    agent = driver_agents()
    assert agent.status()["state"] == "idle"
    assert agent.status()["backend"] == "nvml"
    fake_driver.set(gpu__1__utilization__gpu_pct=85)
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 1)) >= 2, 20, "recorded rows")
    assert float(_gpu_rows(agent.log_dir, 1)[-1]["utilization_gpu_pct"]) == 85.0
    fake_driver.set(gpu__1__utilization__gpu_pct=2)
    wait_for(lambda: not agent.status()["telemetry_active"], 15, "telemetry off")
    wait_for(lambda: agent.status()["state"] == "idle", 15, "idle")
    states = [(r["from_state"], r["to_state"]) for r in agent.transitions()]
    for step in [("idle", "arming"), ("arming", "active"), ("active", "cooling")]:
        assert step in states
    assert ("telemetry_off", "telemetry_on") in states
    assert ("telemetry_on", "telemetry_off") in states
    assert agent.terminate() == 0


def test_a_lost_gpu_keeps_the_others_recording(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    agent = driver_agents()
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 1)) >= 2, 20, "recorded rows")
    fake_driver.set(gpu__1__all__error=GPU_IS_LOST)
    wait_for(lambda: (r := _gpu_rows(agent.log_dir, 1)) and r[-1]["lost"] == "1", 15, "GPU 1 lost")
    count0 = len(_gpu_rows(agent.log_dir, 0))
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 0)) >= count0 + 3, 15, "GPU 0 rows")
    last = _gpu_rows(agent.log_dir, 1)[-1]
    assert last["utilization_gpu_pct"] == "" and last["uuid"].startswith("GPU-fake-0001")
    assert _gpu_rows(agent.log_dir, 0)[-1]["lost"] == "0"
    assert 'gputel_gpu_lost{gpu="1"' in agent.metrics()
    status = agent.status()
    assert {g["index"]: g["utilization_gpu_pct"] for g in status["gpus"]} == {0: 0.0, 1: None}
    assert agent.terminate() == 0


def test_a_fan_answering_unknown_is_counted_not_lost(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    fake_driver.set(gpu__1__fan_speed__error=UNKNOWN)
    agent = driver_agents()
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 1)) >= 3, 20, "recorded rows")
    assert all(r["lost"] == "0" for r in _gpu_rows(agent.log_dir, 1))
    text = wait_for(
        lambda: "gputel_gpu_field_errors_total" in (t := agent.metrics()) and t, 10, "the counter"
    )
    line = next(x for x in text.splitlines() if x.startswith("gputel_gpu_field_errors_total{"))
    assert 'field="fan_speed_pct"' in line and 'gpu="1"' in line
    promtool_ok(text)
    assert agent.terminate() == 0


def test_a_mig_gpu_is_named_in_status_and_log(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    # Without GPM: a MIG GPU with GPM is measured by its instances (tests/test_gpm_e2e.py).
    fake_driver.set(
        gpu__0__mig__mode=1, gpu__0__utilization__gpu_pct=None, gpu__0__gpm__supported=0
    )
    agent = driver_agents()
    notice = agent.status()["notice"]
    assert "GPU 0" in notice and "MIG mode" in notice and "activity cannot be measured" in notice
    assert "MIG mode" in agent.stderr()
    assert agent.terminate() == 0


# ---------------------------------------------------------------------------------- hung calls
def test_a_hung_call_degrades_the_agent_but_not_its_loop(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, tmp_path: Path
) -> None:
    notify_path = tmp_path / "n.sock"
    with NotifyListener(notify_path) as notify:
        messages = notify.messages
        agent = driver_agents(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="600000")
        wait_for(lambda: "READY=1" in " ".join(messages), 10, "READY=1")
        fake_driver.set(gpu__0__utilization__sleep_ms=120_000)
        status = wait_for(
            lambda: (s := agent.status()) and s["degraded"] and s, 15, "degraded status"
        )
        assert status["degraded"].startswith("GPU read stuck")
        pings = messages.count("WATCHDOG=1")
        wait_for(lambda: messages.count("WATCHDOG=1") >= pings + 3, 10, "watchdog pings")
        for _ in range(3):
            assert agent.status()["degraded"]  # answers every time, within its deadline
        t0 = time.monotonic()
        assert agent.terminate() == 0  # SIGTERM is honoured with a call still hung
        assert time.monotonic() - t0 < 8


def test_the_agent_recovers_when_the_hung_call_returns(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    agent = driver_agents()
    fake_driver.set(gpu__0__utilization__sleep_ms=120_000)
    wait_for(lambda: agent.status()["degraded"], 15, "degraded")
    fake_driver.set(gpu__0__utilization__sleep_ms=None)
    wait_for(lambda: agent.status()["degraded"] is None, 15, "recovered")
    assert agent.status()["gpus"][0]["utilization_gpu_pct"] == 0.0
    assert agent.terminate() == 0


def test_a_hung_gpu_does_not_stall_the_recorder(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    """Host rows and the healthy GPU's rows keep coming; the hung GPU is empty and 'stuck'."""
    agent = driver_agents()
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    wait_for(lambda: len(_gpu_rows(agent.log_dir, 0)) >= 2, 20, "recorded rows")
    # Only the recorder's full read asks for temperature: the agent's light read stays healthy.
    fake_driver.set(gpu__0__temperature__sleep_ms=120_000)
    child = wait_for(
        lambda: (c := agent.status()["child"]) and c.get("gpus_stuck") == [0] and c,
        15,
        "GPU 0 stuck in status",
    )
    hosts = len(_rows(agent.log_dir, "host-*.csv"))
    gpu1 = len(_gpu_rows(agent.log_dir, 1))
    wait_for(
        lambda: (
            len(_rows(agent.log_dir, "host-*.csv")) >= hosts + 5
            and len(_gpu_rows(agent.log_dir, 1)) >= gpu1 + 5
        ),
        20,
        "host and GPU 1 rows during the hang",
    )
    assert agent.status()["child"]["pid"] == child["pid"]  # not killed as hung
    stuck_rows = [r for r in _gpu_rows(agent.log_dir, 0)[-3:]]
    assert all(r["temperature_c"] == "" and r["power_w"] == "" for r in stuck_rows)
    assert all(r["lost"] == "0" for r in stuck_rows)
    assert float(_gpu_rows(agent.log_dir, 1)[-1]["temperature_c"]) == 31.0
    text = agent.metrics()
    stuck = [x for x in text.splitlines() if x.startswith("gputel_gpu_read_stuck{")]
    assert any('gpu="0"' in x and x.endswith(" 1.0") for x in stuck)
    assert any('gpu="1"' in x and x.endswith(" 0.0") for x in stuck)

    fake_driver.set(gpu__0__temperature__sleep_ms=None)
    wait_for(lambda: agent.status()["child"]["gpus_stuck"] == [], 15, "GPU 0 reading again")
    wait_for(
        lambda: _gpu_rows(agent.log_dir, 0)[-1]["temperature_c"] == "31.00", 15, "GPU 0 values"
    )
    assert agent.terminate() == 0


def test_a_hung_gpu_does_not_freeze_the_agents_decisions(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, tmp_path: Path
) -> None:
    """Every call on GPU 1 blocks; GPU 0 turning busy still starts telemetry within
    START_SECONDS plus a few seconds, and status and /metrics name GPU 1 stuck."""
    notify_path = tmp_path / "n.sock"
    with NotifyListener(notify_path) as notify:
        messages = notify.messages
        agent = driver_agents(NOTIFY_SOCKET=str(notify_path), WATCHDOG_USEC="600000")
        wait_for(lambda: "READY=1" in " ".join(messages), 10, "READY=1")
        fake_driver.set(gpu__1__all__sleep_ms=120_000)
        status = wait_for(
            lambda: (s := agent.status()) and s["gpus"][1]["stuck"] and s, 15, "GPU 1 stuck"
        )
        assert status["gpus"][0]["stuck"] is False and status["telemetry_active"] is False
        assert status["degraded"].startswith("GPU read stuck")
        fake_driver.set(gpu__0__utilization__gpu_pct=90)
        status = wait_for(
            lambda: (s := agent.status())["telemetry_active"] and s,
            0.3 + 5,  # GPUTEL_START_SECONDS (driver_agents) plus a few seconds
            "telemetry on while GPU 1 is hung",
        )
        assert status["state"] == "active"
        g0, g1 = status["gpus"]
        assert g0["utilization_gpu_pct"] == 90.0 and not g0["stuck"]
        assert g1["utilization_gpu_pct"] is None and g1["stuck"]
        assert "GPU 1" in status["degraded"]
        # GPU 0's energy is still read for an allocation on it; GPU 1's is unknown, not waited for.
        reply = agent.ask({"op": "allocate", "id": "job-0", "gpus": [0], "pid": None})
        assert reply["ok"] and reply["allocation"]["start_energy_j"]["0"] == 1_000_000.0
        text = agent.metrics()
        stuck = [x for x in text.splitlines() if x.startswith("gputel_agent_gpu_read_stuck{")]
        assert any('gpu="1"' in x and x.endswith(" 1.0") for x in stuck), stuck
        assert any('gpu="0"' in x and x.endswith(" 0.0") for x in stuck), stuck
        promtool_ok(text)
        human = fake_driver.run_gputel(
            "status", env={"GPUTEL_RUN_DIR": str(agent.run_dir), "COLUMNS": "200"}
        )
        rows = [x.split() for x in human.stdout.splitlines() if "NVIDIA" in x]
        gpus = {r[0]: "stuck" in r for r in rows if r and r[0].isdigit()}
        assert gpus == {"0": False, "1": True}, human.stdout
        pings = messages.count("WATCHDOG=1")
        wait_for(lambda: messages.count("WATCHDOG=1") >= pings + 3, 10, "watchdog pings")
        t0 = time.monotonic()
        assert agent.terminate() == 0  # SIGTERM is honoured with GPU 1's calls hung
        assert time.monotonic() - t0 < 8
