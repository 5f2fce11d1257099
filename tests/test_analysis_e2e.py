"""Analysis over what the real recorder wrote, and replay against what the live agent did."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from gputel.analysis.replay import load_series, replay
from gputel.analysis.report import build_report
from gputel.runtime import SIM_EPOCH_ENV
from gputel.sources.sim import SimGpuSource
from gputel.supervisor.states import Thresholds

INTERVAL = 0.1


def _env(tmp: Path, name: str, **extra: str) -> dict[str, str]:
    (tmp / name / "log").mkdir(parents=True)
    (tmp / name / "run").mkdir(parents=True)
    (tmp / "nosys").mkdir(exist_ok=True)  # an empty sysfs: no RAPL, no hwmon
    return {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_INTERVAL": str(INTERVAL),
        "GPUTEL_LOG_DIR": str(tmp / name / "log"),
        "GPUTEL_RUN_DIR": str(tmp / name / "run"),
        "GPUTEL_SYSFS_ROOT": str(tmp / "nosys"),
        "GPUTEL_EXPORTER_PORT": "0",
        **extra,
    }


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_report_energy_is_the_sim_integral(tmp_path: Path) -> None:
    """A steady 80 % pattern: energy over the recording equals power × elapsed time."""
    env = _env(tmp_path, "rec", GPUTEL_SIM_GPUS="2", GPUTEL_SIM_PATTERN="80:600")
    proc = subprocess.Popen([sys.executable, "-m", "gputel", "record"], env=env)
    try:
        time.sleep(2.0)
    finally:
        _stop(proc)
    report = build_report([tmp_path / "rec" / "log"])
    (session,) = report["sessions"]
    boards = {r.index: r.power_w for r in SimGpuSource(2, "80:600", None).read()}
    for g in session["gpus"]:
        expected_power = boards[g["gpu"]]
        assert expected_power is not None
        assert g["samples"] >= 10
        assert g["missing"] == 0
        assert g["power_mean_w"] == pytest.approx(expected_power, rel=1e-6)
        elapsed = g["duration_s"] - session["interval_s"]
        # Timestamps are wall-clock, the sim integrates on the monotonic clock: agree to 2 %.
        assert g["energy_j"] == pytest.approx(expected_power * elapsed, rel=0.02)
        assert g["util_mean_pct"] == 80.0
    assert session["host_stats"]["samples"] >= 10


def _agent_transitions(path: Path) -> list[tuple[float, str, str]]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    states = {"idle", "arming", "active", "cooling"}
    return [
        (
            datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp(),
            r["from_state"],
            r["to_state"],
        )
        for r in rows
        if r["from_state"] in states and r["to_state"] in states
    ]


def test_replay_agrees_with_the_live_agent(tmp_path: Path) -> None:
    """Same pattern, same epoch: a recorder records the whole timeline while an agent decides.

    Replaying the recording with the agent's thresholds gives the agent's transitions, each
    within one tick (plus scheduling slack on a busy machine).
    """
    pattern = "0:1,90:2,5:0.3,90:1.5,0:3"
    thresholds = {
        "GPUTEL_START_UTIL": "20",
        "GPUTEL_START_SECONDS": "0.5",
        "GPUTEL_STOP_UTIL": "10",
        "GPUTEL_STOP_SECONDS": "1",
    }
    epoch = time.monotonic()
    common = {"GPUTEL_SIM_GPUS": "2", "GPUTEL_SIM_PATTERN": pattern, SIM_EPOCH_ENV: repr(epoch)}
    rec = subprocess.Popen(
        [sys.executable, "-m", "gputel", "record"], env=_env(tmp_path, "rec", **common)
    )
    agent = subprocess.Popen(
        [sys.executable, "-m", "gputel", "agent"],
        env=_env(tmp_path, "agent", **common, **thresholds),
    )
    try:
        deadline = epoch + 8.5
        while time.monotonic() < deadline:
            assert agent.poll() is None, "agent exited"
            time.sleep(0.2)
    finally:
        _stop(agent)
        _stop(rec)
    live = _agent_transitions(tmp_path / "agent" / "log" / "transitions.csv")
    series = load_series([tmp_path / "rec" / "log"])
    result = replay(series, Thresholds(20, 0.5, 10, 1))
    replayed = [(t.at, t.from_state.value, t.to_state.value) for t in result.transitions]
    assert [(a, b) for _, a, b in live] == [(a, b) for _, a, b in replayed], (live, replayed)
    assert [b for _, _, b in replayed] == [
        "arming",
        "active",
        "cooling",
        "active",
        "cooling",
        "idle",
    ]
    slack = INTERVAL + 0.15
    for (t_live, *_), (t_replay, *_) in zip(live, replayed, strict=True):
        assert abs(t_live - t_replay) <= slack, (live, replayed)
