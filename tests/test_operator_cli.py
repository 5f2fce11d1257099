"""``gputel start | stop | auto`` against a control server with a test handler; agent start-up."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from gputel.cli import operator_cmd
from gputel.cli.main import app
from gputel.control import launch as agent_launch
from gputel.control.client import agent_answers
from gputel.control.launch import AgentStartError, ensure_agent
from gputel.control.server import ControlServer
from gputel.formats import process_alive
from gputel.runtime import CONTROL_SOCKET
from gputel.settings import load_settings


class ModeHandler:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        if req["op"] != "set_mode":
            return {"ok": True}
        until = None
        if req["for_s"] is not None:
            moment = datetime.now(timezone.utc) + timedelta(seconds=req["for_s"])
            until = moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {"ok": True, "mode": req["mode"], "until": until}


@pytest.fixture
def agent(run_dir: Path) -> Iterator[ModeHandler]:
    handler = ModeHandler()
    with ControlServer(run_dir / CONTROL_SOCKET, handler):
        yield handler


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_start_for(agent: ModeHandler) -> None:
    result = invoke("start", "--for", "15m")
    assert result.exit_code == 0, result.output
    assert agent.calls == [{"op": "set_mode", "mode": "on", "for_s": 900.0}]
    assert result.stdout.startswith("telemetry on until ")
    assert re.search(
        r"until \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \(then auto\)$", result.stdout.rstrip()
    ), result.stdout


def test_start_without_for(agent: ModeHandler) -> None:
    result = invoke("start")
    assert result.exit_code == 0, result.output
    assert agent.calls == [{"op": "set_mode", "mode": "on", "for_s": None}]
    assert result.stdout.strip() == "telemetry on until `gputel auto`"


def test_stop_and_auto(agent: ModeHandler) -> None:
    result = invoke("stop", "--for", "0.5h")
    assert result.exit_code == 0, result.output
    assert "telemetry off until" in result.stdout
    result = invoke("auto")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("automatic")
    assert agent.calls == [
        {"op": "set_mode", "mode": "off", "for_s": 1800.0},
        {"op": "set_mode", "mode": "auto", "for_s": None},
    ]


@pytest.mark.parametrize("value", ["", "soon", "-5", "0", "0s", "5 parsecs", "1e400", "400d"])
@pytest.mark.parametrize("command", ["start", "stop"])
def test_bad_for_exits_2(agent: ModeHandler, command: str, value: str) -> None:
    result = invoke(command, "--for", value)
    assert result.exit_code == 2
    assert "--for" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert agent.calls == []


def test_auto_has_no_for(agent: ModeHandler) -> None:
    result = invoke("auto", "--for", "5m")
    assert result.exit_code == 2
    assert agent.calls == []


def test_agent_refusal_is_exit_1(run_dir: Path) -> None:
    with ControlServer(run_dir / CONTROL_SOCKET, lambda r: {"ok": False, "error": "nope"}):
        result = invoke("stop")
    assert result.exit_code == 1
    assert "nope" in result.stderr


@pytest.mark.parametrize("command", ["stop", "auto"])
def test_stop_and_auto_without_agent(run_dir: Path, command: str) -> None:
    result = invoke(command)
    assert result.exit_code == 1
    assert "agent not running" in result.stderr
    assert not (run_dir / "agent.log").exists()  # nothing was started


def test_start_without_agent_starts_one(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = ModeHandler()
    servers: list[ControlServer] = []

    def fake_ensure(settings: Any, wait_s: float = 1.5) -> str:
        srv = ControlServer(settings.run_dir / CONTROL_SOCKET, handler)
        srv.start()
        servers.append(srv)
        return "started a local agent (pid 1), log: x"

    monkeypatch.setattr(agent_launch, "ensure_agent", fake_ensure)
    try:
        result = invoke("start", "--for", "90s")
    finally:
        for srv in servers:
            srv.stop()
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == "started a local agent (pid 1), log: x"
    assert lines[1].startswith("telemetry on until")
    assert handler.calls == [{"op": "set_mode", "mode": "on", "for_s": 90.0}]


def test_start_reports_start_failure(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(settings: Any, wait_s: float = 1.5) -> str:
        raise AgentStartError("cannot start a local agent: no")

    monkeypatch.setattr(agent_launch, "ensure_agent", failing)
    result = invoke("start")
    assert result.exit_code == 1
    assert result.stderr.strip() == "gputel: cannot start a local agent: no"


def test_describe_mode_lines() -> None:
    assert operator_cmd.describe_mode({"mode": "on", "until": None}) == (
        "telemetry on until `gputel auto`"
    )
    today = datetime.now(timezone.utc).replace(hour=4, minute=35, second=0, microsecond=0)
    line = operator_cmd.describe_mode(
        {"mode": "on", "until": today.isoformat().replace("+00:00", "Z")}
    )
    assert line == f"telemetry on until {today.strftime('%Y-%m-%d')}T04:35:00.000Z (then auto)"
    line = operator_cmd.describe_mode({"mode": "off", "until": "2031-02-03T04:05:06.5+00:00"})
    assert line == "telemetry off until 2031-02-03T04:05:06.500Z (then auto)"


# ---------------------------------------------------------------------------------- ensure_agent
def test_ensure_agent_when_one_answers(agent: ModeHandler, run_dir: Path) -> None:
    settings = load_settings()
    assert ensure_agent(settings) == "agent already running"


def test_ensure_agent_local_agent_that_dies_is_an_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spawned agent exits at once (a bad setting in its environment): AgentStartError."""
    monkeypatch.setattr(agent_launch, "_systemd_running", lambda: False)
    settings = load_settings()
    bad_env = {**settings.to_env(), "GPUTEL_INTERVAL": "nonsense"}
    monkeypatch.setattr(type(settings), "to_env", lambda self: bad_env)
    start = time.monotonic()
    with pytest.raises(AgentStartError) as info:
        ensure_agent(settings, wait_s=10)
    assert time.monotonic() - start < 8
    assert "exited at once" in str(info.value)
    assert "GPUTEL_INTERVAL" in str(info.value)  # the log's last line says why
    assert (run_dir / "agent.log").exists()


def test_ensure_agent_starts_a_detached_local_agent(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ``gputel agent`` on simulated GPUs: started detached, answers, is not our child."""
    monkeypatch.setattr(agent_launch, "_systemd_running", lambda: False)
    monkeypatch.setenv("GPUTEL_BACKEND", "sim")
    monkeypatch.setenv("GPUTEL_EXPORTER_PORT", "0")
    monkeypatch.setenv("GPUTEL_LOG_DIR", str(tmp_path / "log"))
    settings = load_settings()
    how = ensure_agent(settings, wait_s=15)
    pid = int(how.split("pid ")[1].split(")")[0])
    try:
        assert how.startswith("started a local agent (pid ")
        assert str(run_dir / "agent.log") in how
        assert agent_answers(run_dir)
        assert os.getsid(pid) != os.getsid(0)  # its own session: no terminal signals reach it
        with open(f"/proc/{pid}/stat") as fh:
            ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        assert ppid != os.getpid()  # re-parented: the caller never has to reap it
        result = subprocess.run(
            [sys.executable, "-m", "gputel", "stop"],
            env={**os.environ},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert ensure_agent(settings) == "agent already running"
    finally:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.05)


def test_unit_run_dir(tmp_path: Path) -> None:
    defaults = tmp_path / "gputel"
    assert agent_launch.unit_run_dir(defaults) == Path("/run/gputel")
    defaults.write_text("# comment\nGPUTEL_INTERVAL=1\nGPUTEL_RUN_DIR='/srv/gputel/run'\n")
    assert agent_launch.unit_run_dir(defaults) == Path("/srv/gputel/run")


@pytest.fixture
def fake_systemd(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """systemd present, the unit installed for this run dir; "starting" it brings up a server."""
    started: list[str] = []
    servers: list[ControlServer] = []

    def start(timeout: float = 1.0) -> tuple[bool, str]:
        started.append("start")
        srv = ControlServer(run_dir / CONTROL_SOCKET, ModeHandler())
        srv.start()
        servers.append(srv)
        return True, ""

    monkeypatch.setattr(agent_launch, "_systemd_running", lambda: True)
    monkeypatch.setattr(agent_launch, "_unit_installed", lambda timeout=1.0: True)
    monkeypatch.setattr(agent_launch, "unit_run_dir", lambda: run_dir)
    monkeypatch.setattr(agent_launch, "_systemctl_start", start)
    yield started
    for srv in servers:
        srv.stop()


def test_ensure_agent_prefers_systemd(fake_systemd: list[str]) -> None:
    assert ensure_agent(load_settings()) == "started gputel.service via systemctl"
    assert fake_systemd == ["start"]


def test_ensure_agent_systemd_failure_as_root_is_an_error(
    fake_systemd: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        agent_launch, "_systemctl_start", lambda timeout=1.0: (False, "unit failed")
    )
    monkeypatch.setattr(agent_launch.os, "geteuid", lambda: 0)
    spawned: list[Any] = []
    monkeypatch.setattr(agent_launch, "_spawn_local", lambda s: spawned.append(s))
    with pytest.raises(
        AgentStartError, match=r"systemctl start gputel\.service failed: unit failed"
    ):
        ensure_agent(load_settings())
    assert spawned == []  # never a second agent next to a unit that is failing


def test_ensure_agent_other_run_dir_uses_a_local_agent(
    fake_systemd: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(agent_launch, "unit_run_dir", lambda: Path("/run/gputel"))
    monkeypatch.setattr(agent_launch, "_spawn_local", lambda s: (None, "/dev/null"))
    how = ensure_agent(load_settings(), wait_s=0.2)
    assert fake_systemd == []
    assert how.startswith("started a local agent (pid unknown), not answering")


def test_ensure_agent_is_bounded(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemctl that hangs and an agent that never answers: still about wait_s in all."""

    def slow_start(timeout: float = 1.0) -> tuple[bool, str]:
        time.sleep(timeout)
        return True, ""

    monkeypatch.setattr(agent_launch, "_systemd_running", lambda: True)
    monkeypatch.setattr(agent_launch, "_unit_installed", lambda timeout=1.0: True)
    monkeypatch.setattr(agent_launch, "unit_run_dir", lambda: run_dir)
    monkeypatch.setattr(agent_launch, "_systemctl_start", slow_start)
    start = time.monotonic()
    how = ensure_agent(load_settings(), wait_s=0.5)
    assert time.monotonic() - start < 0.9
    assert "not answering" in how
