"""``gputel status``: local snapshot without an agent, the agent's object with one, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gputel.cli import status_cmd
from gputel.cli.main import app
from gputel.control.server import ControlServer
from gputel.runtime import CONTROL_SOCKET
from gputel.schema import GpuReading, HostReading

GPUTEL = [sys.executable, "-m", "gputel"]


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["status", *args])


def test_sim_gpus_follow_the_pattern(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_BACKEND", "sim")
    monkeypatch.setenv("GPUTEL_SIM_GPUS", "3")
    monkeypatch.setenv("GPUTEL_SIM_PATTERN", "37:100;55:100")
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["agent"] == "not running"
    assert status["state"] is None and status["mode"] is None
    assert status["telemetry_active"] is False
    assert status["allocations"] == []
    assert [g["index"] for g in status["gpus"]] == [0, 1, 2]
    assert [g["utilization_gpu_pct"] for g in status["gpus"]] == [37, 55, 55]
    # The processes are listed once, at the top level, with their owners.
    gpu_keys = {f for f in GpuReading.__dataclass_fields__} - {"processes"} | {"gpm"}
    assert [(p["gpu"], p["job"]) for p in status["processes"]] == [
        (0, None),
        (0, None),
        (1, None),
        (1, None),
        (2, None),
        (2, None),
    ]
    for g in status["gpus"]:
        assert set(g) == gpu_keys
        assert g["fan_speed_pct"] is None  # unsupported is null, never 0
    assert set(HostReading.__dataclass_fields__) <= set(status["host"])
    assert status["notice"] is None


def test_sim_status_from_the_real_entry_point(run_dir: Path) -> None:
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "3",
        "GPUTEL_RUN_DIR": str(run_dir),
    }
    done = subprocess.run(
        [*GPUTEL, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["agent"] == "not running"
    assert len(status["gpus"]) == 3
    # The default pattern starts with 0:5: the GPUs are idle at the start of their timeline.
    assert all(g["utilization_gpu_pct"] == 0 for g in status["gpus"])


def test_selected_gpus_only(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_BACKEND", "sim")
    monkeypatch.setenv("GPUTEL_SIM_GPUS", "4")
    result = invoke("--json", "--gpus", "1,3")
    assert result.exit_code == 0, result.output
    assert [g["index"] for g in json.loads(result.stdout)["gpus"]] == [1, 3]


def test_default_backend_without_gpu(run_dir: Path) -> None:
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    status = json.loads(result.stdout)
    assert status["agent"] == "not running"
    if not status["gpus"]:  # this machine has no usable NVML
        assert "no GPU" in status["notice"]
        human = invoke()
        assert human.exit_code == 0
        assert "agent: not running" in human.stdout
        assert "no GPU found" in human.stdout
        assert "Traceback" not in human.output


def test_backend_none_says_no_gpu(run_dir: Path) -> None:
    result = invoke("--backend", "none")
    assert result.exit_code == 0, result.output
    assert "agent: not running" in result.stdout
    assert "no GPU found" in result.stdout


def test_human_table_with_sim(run_dir: Path) -> None:
    result = invoke("--backend", "sim", "--sim-gpus", "2")
    assert result.exit_code == 0, result.output
    assert "agent: not running" in result.stdout
    assert "Simulated H100" in result.stdout
    assert "host:" in result.stdout


def test_hung_gpu_read_does_not_freeze_status(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def hang(settings: Any) -> Any:
        release.wait(30)
        raise RuntimeError("released")

    monkeypatch.setattr("gputel.sources.select.open_gpu_source", hang)
    monkeypatch.setattr(status_cmd, "GPU_READ_DEADLINE_S", 0.3)
    try:
        start = time.monotonic()
        result = invoke("--json", "--backend", "nvml")
        elapsed = time.monotonic() - start
    finally:
        release.set()
    assert elapsed < 2.0
    status = json.loads(result.stdout)
    assert status["gpus"] == []
    assert "did not finish" in status["notice"]
    assert result.exit_code == 1  # an explicitly requested backend that fails is a failure


BAD_SETTINGS = [
    ("GPUTEL_BACKEND", "cuda"),
    ("GPUTEL_INTERVAL", "0"),
    ("GPUTEL_INTERVAL", "soon"),
    ("GPUTEL_START_UTIL", "101"),
    ("GPUTEL_START_SECONDS", "-5"),
    ("GPUTEL_STOP_UTIL", "lots"),
    ("GPUTEL_STOP_SECONDS", "1y"),
    ("GPUTEL_GPUS", "0,x"),
    ("GPUTEL_GPUS", "1,1"),
    ("GPUTEL_LOG_DIR", "   "),
    ("GPUTEL_RUN_DIR", "   "),
    ("GPUTEL_EXPORTER_ADDR", "example.com"),
    ("GPUTEL_EXPORTER_PORT", "70000"),
    ("GPUTEL_SYSFS_ROOT", "   "),
    ("GPUTEL_SIM_GPUS", "0"),
    ("GPUTEL_SIM_PATTERN", "0:5,eighty:20"),
    ("GPUTEL_SIM_PATTERN", "0:5;50:-1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_bad_setting_exits_2_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    if name != "GPUTEL_RUN_DIR":
        monkeypatch.setenv("GPUTEL_RUN_DIR", str(tmp_path))
    monkeypatch.setenv(name, value)
    result = invoke("--json")
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert name in lines[0]
    assert "Traceback" not in result.output


def test_bad_pattern_segment_is_named(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_SIM_PATTERN", "0:5,eighty:20")
    result = invoke()
    assert result.exit_code == 2
    assert "eighty:20" in result.stderr


def test_inconsistent_thresholds(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_START_UTIL", "10")
    monkeypatch.setenv("GPUTEL_STOP_UTIL", "30")
    result = invoke()
    assert result.exit_code == 2
    assert "GPUTEL_STOP_UTIL" in result.stderr


def test_bad_flag_names_the_flag(run_dir: Path) -> None:
    result = invoke("--interval", "-1")
    assert result.exit_code == 2
    assert "--interval" in result.stderr


def test_bad_setting_from_the_real_entry_point(tmp_path: Path) -> None:
    env = {**os.environ, "GPUTEL_SIM_PATTERN": "0:5,80:0", "GPUTEL_RUN_DIR": str(tmp_path)}
    done = subprocess.run(
        [*GPUTEL, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "GPUTEL_SIM_PATTERN" in done.stderr and "80:0" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------- with an agent
AGENT_STATUS: dict[str, Any] = {
    "agent": "running",
    "pid": 4242,
    "state": "active",
    "mode": "on",
    "mode_until": "2030-01-01T04:35:00.000Z",
    "telemetry_active": True,
    "telemetry_reason": "operator mode on",
    "allocations": [{"id": "job-42", "gpus": [0, 1], "pid": None, "start": "2030-01-01T04:00Z"}],
    "gpus": [{"index": 0, "uuid": "GPU-x", "name": "Fake GPU", "utilization_gpu_pct": 93.0}],
    "child": {"pid": 4343, "uptime_s": 75.5, "files": {"gpu": "/var/log/gputel/gpu-1.csv"}},
    "transitions": [
        {
            "timestamp": "2030-01-01T04:00:00.000Z",
            "from_state": "idle",
            "to_state": "arming",
            "reason": "utilization 93% >= 20%",
        }
    ],
    "degraded": None,
}


@pytest.fixture
def fake_agent(run_dir: Path) -> Iterator[list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []

    def handler(req: dict[str, Any]) -> dict[str, Any]:
        calls.append(req)
        return {"ok": True, **AGENT_STATUS}

    with ControlServer(run_dir / CONTROL_SOCKET, handler):
        yield calls


def test_status_shows_the_agents_object(fake_agent: list[dict[str, Any]]) -> None:
    result = invoke("--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == AGENT_STATUS
    assert fake_agent == [{"op": "status"}]


def test_status_human_with_agent(fake_agent: list[dict[str, Any]]) -> None:
    result = invoke()
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "agent: running, pid 4242" in out
    assert "state: active" in out and "mode: on" in out
    assert "telemetry: on (operator mode on)" in out
    assert "recorder: pid 4343" in out and "gpu-1.csv" in out
    assert "job-42" in out and "Fake GPU" in out and "arming" in out


def test_agent_refusal_is_exit_1(run_dir: Path) -> None:
    with ControlServer(run_dir / CONTROL_SOCKET, lambda r: {"ok": False, "error": "starting"}):
        result = invoke("--json")
    assert result.exit_code == 1
    assert "starting" in result.stderr


def test_stuck_agent_is_reported_not_waited_for(run_dir: Path) -> None:
    import socket

    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(run_dir / CONTROL_SOCKET))
    mute.listen(1)
    try:
        start = time.monotonic()
        result = invoke("--json")
        assert time.monotonic() - start < 3.5
    finally:
        mute.close()
    assert result.exit_code == 1
    assert "did not answer" in result.stderr


def test_status_is_fast_with_an_agent(fake_agent: list[dict[str, Any]], run_dir: Path) -> None:
    """The real command, process start included; generous bound for slow CI machines."""
    env = {**os.environ, "GPUTEL_RUN_DIR": str(run_dir)}
    best = float("inf")
    for _ in range(2):
        start = time.monotonic()
        done = subprocess.run(
            [*GPUTEL, "status", "--json"], env=env, capture_output=True, text=True, timeout=30
        )
        best = min(best, time.monotonic() - start)
        assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["state"] == "active"
    assert best < 1.5
