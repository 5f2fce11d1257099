"""``gputel demo`` runs the real agent through one cycle and leaves only files behind."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from gputel.cli.demo import demo_env, render, run_demo
from gputel.cli.main import app


def test_demo_cycle_on_a_short_timeline(tmp_path: Path) -> None:
    out = io.StringIO()
    console = Console(file=out, width=140, force_terminal=False)
    result = run_demo(
        console,
        directory=tmp_path / "demo",
        pattern="0:1,85:2.5,0:30",
        interval_s=0.2,
        start_s=0.5,
        stop_s=1.0,
        events="0:94@2.5",
        max_seconds=25,
        poll_s=0.1,
    )
    text = out.getvalue()
    assert result.ok, text
    assert "active" in result.states_seen and result.states_seen[-1] == "idle"
    names = sorted(p.name for p in result.files)
    assert "transitions.csv" in names
    assert any(n.startswith("gpu-") for n in names) and any(n.startswith("host-") for n in names)
    with open(result.log_dir / "transitions.csv", newline="") as fh:
        to_states = [r["to_state"] for r in csv.DictReader(fh)]
    assert to_states[:3] == ["arming", "active", "telemetry_on"]
    assert to_states[-1] == "telemetry_off"
    assert "events.csv" in names
    with open(result.log_dir / "events.csv", newline="") as fh:
        (event,) = csv.DictReader(fh)
    assert (event["gpu"], event["event"], event["xid"]) == ("0", "xid", "94")
    assert str(result.log_dir) in text and "done" in text
    assert not (tmp_path / "demo" / "run" / "control.sock").exists()


def test_demo_env_is_self_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_LOG_DIR", "/var/log/gputel")
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    env = demo_env(tmp_path, port=1234)
    assert env["GPUTEL_LOG_DIR"] == str(tmp_path / "log")
    assert env["GPUTEL_BACKEND"] == "sim" and env["GPUTEL_EXPORTER_PORT"] == "1234"
    assert "NOTIFY_SOCKET" not in env


def test_render_before_the_agent_answers() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=100)
    console.print(render(None, 1.0))
    waiting = buf.getvalue()
    assert "starting the agent" in waiting and "1.0s" in waiting
    console.print(
        render(
            {
                "state": "active",
                "mode": "auto",
                "telemetry_active": True,
                "child": {"pid": 5},
                "gpus": [{"index": 0, "name": "Sim", "utilization_gpu_pct": 85.0}],
                "transitions": [
                    {
                        "timestamp": "2026-01-01T00:00:00.000Z",
                        "from_state": "idle",
                        "to_state": "arming",
                        "reason": "r",
                    }
                ],
            },
            3.0,
        )
    )
    shown = buf.getvalue()[len(waiting) :]
    assert "active" in shown and "ON (recorder pid 5)" in shown
    assert "85.0%" in shown and "Sim" in shown
    assert "00:00:00.000" in shown and "arming" in shown


def test_demo_help() -> None:
    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0
    assert "--keep" in result.output


def test_closing_the_terminal_stops_the_demo_agent(tmp_path: Path) -> None:
    """SIGHUP to `gputel demo` (a closed terminal) must not leave its agent running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from gputel import runtime
    from gputel.control.client import request
    from gputel.control.protocol import ControlError

    demo = subprocess.Popen(
        [sys.executable, "-m", "gputel", "demo", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    agent_pid = None
    deadline = time.monotonic() + 20
    while agent_pid is None and time.monotonic() < deadline:
        try:
            agent_pid = request(tmp_path / "run", {"op": "status"}, timeout=1.0).get("pid")
        except ControlError:
            time.sleep(0.1)
    assert agent_pid, "the demo's agent never answered"
    assert (tmp_path / "run" / runtime.CONTROL_SOCKET).exists()
    demo.send_signal(signal.SIGHUP)
    assert demo.wait(timeout=15) != 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(agent_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(agent_pid, signal.SIGKILL)
        raise AssertionError("the demo's agent outlived the demo")
