"""``gputel status`` under a real (simulated) agent: the per-GPU view, ``--watch``, and settings
flags that cannot reach a running agent."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from gputel.cli.status_cmd import renderables
from gputel.formats import process_alive
from test_agent_e2e import AgentProc, wait_for

GPUTEL = [sys.executable, "-m", "gputel"]
ISO_MS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def sim_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    """A real ``gputel agent`` on 2 simulated GPUs, busy at once (90 % and 40 %)."""
    agents: list[AgentProc] = []

    def make(**env: str) -> AgentProc:
        base = {"GPUTEL_EXPORTER_PORT": "0", "GPUTEL_SIM_PATTERN": "90:600;40:600"}
        a = AgentProc(tmp_path / f"a{len(agents)}", {**base, **env})
        agents.append(a)
        return a

    yield make
    for a in agents:
        child = (a.try_status() or {}).get("child") if a.proc.poll() is None else None
        a.terminate()
        pid = child.get("pid") if isinstance(child, dict) else None
        if isinstance(pid, int) and process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def gputel(agent: AgentProc, *args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    env.update(GPUTEL_RUN_DIR=str(agent.run_dir), COLUMNS=str(columns))
    return subprocess.run([*GPUTEL, *args], env=env, capture_output=True, text=True, timeout=60)


def gpu_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if "Simulated" in line]


# ---------------------------------------------------------------------------------- per-GPU view
def test_per_gpu_view_from_the_recorder_and_the_agents_light_read(
    sim_agent: Callable[..., AgentProc],
) -> None:
    agent = sim_agent()
    # Idle telemetry (arming): the agent's light read (the pre-trigger's) gives most values.
    status = wait_for(
        lambda: (s := agent.status())["gpus"][0]["values_from"] == "agent" and s,
        15,
        "the agent's light read",
    )
    g0 = status["gpus"][0]
    assert g0["utilization_gpu_pct"] == 90.0 and g0["memory_used_mib"] is not None
    assert g0["power_w"] is not None and g0["temperature_c"] is not None
    # What the light read does not make is unknown, not 0.
    assert g0["memory_total_mib"] is None and g0["power_limit_w"] is None
    assert g0["clock_event_reasons"] is None and g0["throttle_reasons"] is None
    assert re.fullmatch(ISO_MS, g0["values_at"])
    assert status["settings"]["GPUTEL_INTERVAL"] == "0.1"

    # Recording (telemetry on, an allocation on GPU 1): the recorder's tick has everything.
    assert gputel(agent, "start").returncode == 0
    assert gputel(agent, "hook", "allocate", "job-7", "--gpus", "1", "-q").returncode == 0
    status = wait_for(
        lambda: (s := agent.status())["gpus"][1]["values_from"] == "recorder" and s,
        20,
        "the recorder's values in status",
    )
    g1 = status["gpus"][1]
    assert g1["memory_total_mib"] == 81559.0 and g1["power_limit_w"] == 700.0
    assert g1["clock_event_reasons"] == 0 and g1["throttle_reasons"] == []
    assert g1["stuck"] is False and g1["lost"] is False

    done = gputel(agent, "status")
    assert done.returncode == 0, done.stderr
    rows = gpu_rows(done.stdout)
    assert len(rows) == 2 and all(len(line) <= 80 for line in done.stdout.splitlines())
    assert re.search(r"\b90%\s+\d+%\s+\d+/81559\s+\d+\s+\d+/700\s+none\b", rows[0]), rows
    assert rows[1].rstrip().endswith("job-7") and not rows[0].rstrip().endswith("job-7")
    assert "the rest from the recorder's tick at" in done.stdout


def test_unknown_values_show_as_a_dash(sim_agent: Callable[..., AgentProc]) -> None:
    """No pre-trigger and utilization activity: the agent reads only utilization."""
    agent = sim_agent(GPUTEL_PRETRIGGER_SECONDS="0", GPUTEL_START_SECONDS="600")
    wait_for(lambda: agent.status()["gpus"][0]["utilization_gpu_pct"] == 90.0, 15, "a poll")
    done = gputel(agent, "status")
    assert done.returncode == 0, done.stderr
    row = gpu_rows(done.stdout)[0]
    cells = row.split()
    assert "90%" in cells and cells.count("–") >= 5, row
    assert " 0 " not in row and "0/" not in row
    assert "no other values" in done.stdout


def render(status: dict[str, Any]) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=100, force_terminal=False)
    for part in renderables(status):
        console.print(part)
    return buf.getvalue()


def test_stuck_gpu_and_fields_this_view_does_not_know_yet() -> None:
    status = {
        "agent": "running",
        "pid": 7,
        "state": "idle",
        "mode": "auto",
        "allocations": [{"id": "j1", "gpus": None, "pid": None, "start": "2030-01-01T00:00Z"}],
        "gpus": [
            {
                "index": 0,
                "name": "A",
                "utilization_gpu_pct": 5.0,
                "clock_event_reasons": 0x44,
                "gpm": "available",
            },
            {"index": 1, "name": "B", "stuck": True, "gpu_reset": "pending", "gpm": "refused: x"},
        ],
        "writes_failing": {"gpu": {"since": "2030-01-01T00:00:00.000Z", "rows": 3}},
    }
    text = render(status)
    a, b = (line for line in text.splitlines() if re.match(r"\s*[01]\s+[AB]\b", line))
    # Decoded by the schema's table (the cell wraps between names).
    assert "sw_power_cap," in a and "hw_thermal" in text and "j1" in a
    assert "stuck" in b and "gpm refused: x;" in b and "gpu_reset: pending" in text and "j1" in b
    assert "stuck" not in a and "gpm" not in a
    assert 'writes_failing: {"gpu":{"since":"2030-01-01T00:00:00.000Z","rows":3}}' in text
    assert "2030-01-01T00:00:00.000Z" in text  # the allocation's start, ISO with milliseconds


# ---------------------------------------------------------------------------------- refused flags
def test_settings_flags_that_cannot_reach_the_agent_are_refused(
    sim_agent: Callable[..., AgentProc],
) -> None:
    agent = sim_agent(GPUTEL_START_SECONDS="600")
    done = gputel(agent, "start", "--for", "1m", "--interval", "0.2", "--sim-gpus", "1")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "--interval 0.2 (agent: 0.1)" in lines[0] and "--sim-gpus 1 (agent: 2)" in lines[0]
    assert agent.status()["mode"] == "auto"  # nothing changed

    done = gputel(agent, "hook", "allocate", "job-1", "--stop-util", "5")
    assert done.returncode == 2 and "--stop-util 5 (agent: 10" in done.stderr
    assert agent.status()["allocations"] == []

    done = gputel(agent, "status", "--backend", "none")
    assert done.returncode == 2 and "--backend none (agent: sim)" in done.stderr

    # A flag naming what the agent already has reaches it: accepted.
    done = gputel(agent, "start", "--for", "1m", "--interval", "100ms", "--sim-gpus", "2")
    assert done.returncode == 0, done.stderr
    assert agent.status()["mode"] == "on"


def test_start_applies_flags_to_the_agent_it_starts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    env.update(GPUTEL_RUN_DIR=str(run_dir), GPUTEL_LOG_DIR=str(tmp_path / "log"))
    args = ["--backend", "sim", "--sim-gpus", "1", "--interval", "0.2", "--exporter-port", "0"]
    done = subprocess.run(
        [*GPUTEL, "start", "--for", "1m", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    pid_match = re.search(r"started a local agent \(pid (\d+)\)", done.stdout)
    try:
        assert done.returncode == 0, done.stderr
        assert "; with --backend sim --interval 0.2 --exporter-port 0 --sim-gpus 1" in done.stdout
        status = json.loads(
            subprocess.run(
                [*GPUTEL, "status", "--json"], env=env, capture_output=True, text=True, timeout=60
            ).stdout
        )
        assert status["settings"]["GPUTEL_SIM_GPUS"] == "1" and len(status["gpus"]) == 1
        assert status["interval_s"] == 0.2
    finally:
        if pid_match:
            os.kill(int(pid_match.group(1)), signal.SIGTERM)
            wait_for(lambda: not process_alive(int(pid_match.group(1))), 15, "the agent to stop")


# ---------------------------------------------------------------------------------- --watch
def test_watch_without_a_terminal_prints_each_refresh_until_ctrl_c(
    sim_agent: Callable[..., AgentProc],
) -> None:
    agent = sim_agent()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    env.update(GPUTEL_RUN_DIR=str(agent.run_dir), COLUMNS="80")
    proc = subprocess.Popen(
        [*GPUTEL, "status", "--watch", "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert err == ""  # no traceback, no "Aborted"
    stamps = re.findall(rf"^--- ({ISO_MS})$", out, re.MULTILINE)
    assert len(stamps) >= 2 and stamps == sorted(stamps), out
    assert out.count("Simulated") >= 4


def test_watch_json_is_one_object_per_line(sim_agent: Callable[..., AgentProc]) -> None:
    agent = sim_agent()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    env.update(GPUTEL_RUN_DIR=str(agent.run_dir))
    proc = subprocess.Popen(
        [*GPUTEL, "status", "--watch", "--json", "--interval", "0.1"],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first, second = proc.stdout.readline(), proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert json.loads(first)["agent"] == "running" and json.loads(second)["gpus"]


def test_watch_refreshes_in_place_in_a_terminal(
    sim_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    """The real command in a real terminal (tmux): one view, redrawn; Ctrl-C exits 0."""
    tmux = shutil.which("tmux")
    if tmux is None:
        pytest.skip("tmux is not installed")
    agent = sim_agent()
    server = ["tmux", "-L", f"gputel-watch-test-{os.getpid()}"]
    command = (
        f"GPUTEL_RUN_DIR={agent.run_dir} {sys.executable} -m gputel status --watch "
        "--interval 0.3; echo WATCH-EXIT=$?; sleep 120"
    )
    env = {k: v for k, v in os.environ.items() if k != "TMUX" and not k.startswith("GPUTEL_")}
    subprocess.run(
        [*server, "new-session", "-d", "-x", "80", "-y", "40", "-s", "watch", command],
        check=True,
        env={**env, "TERM": "xterm-256color"},
    )

    def screen() -> str:
        return subprocess.run(
            [*server, "capture-pane", "-p", "-J", "-S", "-400", "-t", "watch"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    try:
        stamps: set[str] = set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(stamps) < 3:
            text = screen()
            stamps |= set(re.findall(rf"every 0\.3s, ({ISO_MS})", text))
            time.sleep(0.2)
        assert len(stamps) >= 3, text  # the time in the header moved: it refreshes
        text = screen()
        assert text.count("gputel status every") == 1, text  # in place, not appended
        assert len(gpu_rows(text)) == 2
        subprocess.run([*server, "send-keys", "-t", "watch", "C-c"], check=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "WATCH-EXIT=" not in text:
            text = screen()
            time.sleep(0.2)
        assert "WATCH-EXIT=0" in text and "Traceback" not in text, text
    finally:
        subprocess.run([*server, "kill-server"], check=False)


def test_hook_allocate_applies_flags_to_the_agent_it_starts(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUTEL_")}
    env.update(GPUTEL_RUN_DIR=str(tmp_path / "run"), GPUTEL_LOG_DIR=str(tmp_path / "log"))
    args = ["--backend", "sim", "--sim-gpus", "1", "--exporter-port", "0", "--wait", "15"]
    done = subprocess.run(
        [*GPUTEL, "hook", "allocate", "job-9", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    pid_match = re.search(r"started a local agent \(pid (\d+)\)", done.stderr)
    try:
        assert done.returncode == 0, done.stderr
        assert "; with --backend sim --exporter-port 0 --sim-gpus 1" in done.stderr
        assert "allocation opened job-9" in done.stdout
    finally:
        if pid_match:
            os.kill(int(pid_match.group(1)), signal.SIGTERM)
            wait_for(lambda: not process_alive(int(pid_match.group(1))), 15, "the agent to stop")


def test_gpu_entries_take_each_value_from_its_source() -> None:
    from gputel.gpu_status import gpu_entries
    from gputel.schema import GpuReading
    from gputel.sources.base import GpuIdentity

    devices = [GpuIdentity(i, f"GPU-{i}", "G", gpm="available") for i in range(3)]
    light = {
        0: GpuReading(0, "GPU-0", "G", power_w=100.0, memory_used_mib=5.0),
        1: GpuReading(1, "GPU-1", "G", power_w=200.0),
    }
    heartbeat = {
        "timestamp": "2030-01-01T00:00:01.000Z",
        "gpus": [
            {"index": 1, "power_w": 210.0, "power_limit_w": 700.0, "clock_event_reasons": 0x4},
            "junk",
        ],
    }
    util = {0: 50.0, 1: 60.0, 2: None}
    g0, g1, g2 = gpu_entries(
        devices, util, util, light, "2030-01-01T00:00:00.500Z", heartbeat, stuck=[2]
    )
    assert (g0["values_from"], g0["values_at"], g0["power_w"]) == (
        "agent",
        "2030-01-01T00:00:00.500Z",
        100.0,
    )
    assert g0["power_limit_w"] is None and g0["throttle_reasons"] is None
    assert (g1["values_from"], g1["power_w"], g1["power_limit_w"]) == ("recorder", 210.0, 700.0)
    assert g1["throttle_reasons"] == ["sw_power_cap"] and g1["values_at"].endswith("01.000Z")
    assert g1["utilization_gpu_pct"] == 60.0  # the agent's poll, whatever the source of the rest
    assert g2["values_from"] is None and g2["power_w"] is None and g2["stuck"] is True
    assert g0["stuck"] is False and g0["gpm"] == "available"
