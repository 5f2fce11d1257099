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
    # It ends with the answer: the session from the report code, the plot, the next commands.
    assert result.summary is not None and result.summary["pretrigger_s"] > 0
    assert [g["gpu"] for g in result.summary["gpus"]] == [0, 1]
    assert result.plot is not None and result.plot.exists()
    assert f"gputel report {result.log_dir}" in text
    # The demo's job, opened and released through the hook API, and the command about it.
    assert result.job == "demo-job-1"
    assert f"gputel job demo-job-1 {result.log_dir}" in text
    with open(result.log_dir / "allocations.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["id"] == "demo-job-1" and row["gpus"] == "0;1" and float(row["energy_j"]) > 0
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
                "gpus": [
                    {"index": 0, "name": "Sim", "utilization_gpu_pct": 85.0, "power_w": 612.5}
                ],
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
            history={0: [0.0, None, 50.0, 100.0]},
        )
    )
    shown = buf.getvalue()[len(waiting) :]
    assert "active" in shown and "ON (recorder pid 5)" in shown
    assert "85.0%" in shown and "Sim" in shown
    assert "00:00:00.000" in shown and "arming" in shown
    assert "612.5 W" in shown and "▁ ▅█" in shown


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


def test_a_person_running_the_demo_sees_the_live_view_and_the_answer(tmp_path: Path) -> None:
    """The real command in a real terminal (tmux): what is on the screen, live and at the end."""
    import os
    import re
    import shutil
    import subprocess
    import sys
    import time

    # A sparkline that rose from idle (▁) to full (█); the utilization bar never draws ▁.
    risen = re.compile("▁[▁▂▃▄▅▆▇]*█")
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    server = ["tmux", "-L", f"gputel-demo-test-{os.getpid()}"]
    demo = (
        f"{sys.executable} -m gputel demo --dir {tmp_path / 'demo'} "
        "--pattern '0:1,100:2.5,0:30' --interval 0.2 --seconds 60; echo DEMO-EXIT=$?; sleep 120"
    )
    env = {k: v for k, v in os.environ.items() if k != "TMUX"}
    subprocess.run(
        [*server, "new-session", "-d", "-x", "120", "-y", "40", "-s", "demo", demo],
        check=True,
        env={**env, "TERM": "xterm-256color"},
    )

    def screen() -> str:
        out = subprocess.run(
            [*server, "capture-pane", "-p", "-J", "-S", "-400", "-t", "demo"],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    try:
        live = ""
        deadline = time.monotonic() + 60
        # The live view while the GPUs work: power in watts and a sparkline that has risen.
        while time.monotonic() < deadline:
            live = screen()
            if "ON (recorder pid" in live and risen.search(live):
                break
            time.sleep(0.2)
        # The sparkline column's header may wrap inside its cell ("utilization, last" / "32 polls").
        assert "utilization, last" in live and "32 polls" in live and risen.search(live), live
        gpu_rows = [line for line in live.splitlines() if "Simulated H100" in line]
        assert gpu_rows and all(re.search(r"\d+\.\d W", row) for row in gpu_rows), live
        final = ""
        while time.monotonic() < deadline and "DEMO-EXIT=" not in final:
            final = screen()
            time.sleep(0.3)
        assert "DEMO-EXIT=0" in final, final
        summary = final.split("The session", 1)[1]
        assert "pre-trigger" in summary and "duration" in summary
        lines = summary.splitlines()
        header = next(line for line in lines if "energy" in line)
        assert all(w in header for w in ("GPU", "mean power", "peak power", "throttled"))
        gpu0 = next(line.split() for line in lines if line.split()[:1] == ["0"])
        # GPU 0 ran at full power for 2.5 s: held by the power cap, so throttled seconds show.
        assert gpu0[1] != "–" and gpu0[2] == "J" and float(gpu0[-2]) > 0, gpu0
        # Long paths may wrap at the terminal's width: compare without whitespace.
        flat = "".join(summary.split())
        assert f"plot:{tmp_path / 'demo' / 'timeline.png'}" in flat
        assert (tmp_path / "demo" / "timeline.png").stat().st_size > 10_000
        assert f"gputelreport{tmp_path / 'demo' / 'log'}" in flat
        assert f"gputelplot{tmp_path / 'demo' / 'log'}" in flat
        assert f"gputeljobdemo-job-1{tmp_path / 'demo' / 'log'}" in flat
    finally:
        subprocess.run([*server, "kill-server"], capture_output=True)


def test_without_the_analysis_extra_the_demo_says_how_to_get_the_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gputel.analysis import duck
    from gputel.cli import demo

    def no_duckdb(threads: int | None = None) -> None:
        raise duck.AnalysisUnavailable(f"this command needs DuckDB: {duck.install_hint()}")

    monkeypatch.setattr(duck, "connect", no_duckdb)
    out = io.StringIO()
    summary, picture = demo._answer(Console(file=out, width=120), tmp_path, tmp_path / "t.png")
    assert (summary, picture) == (None, None)
    assert duck.install_hint() in " ".join(out.getvalue().split())
