"""Hundreds of idle clients on both of the real agent's servers cost real clients nothing."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from flood import IdleConnections
from gputel import hooks
from gputel.control.client import request
from gputel.runtime import CONTROL_SOCKET
from test_agent_e2e import AgentProc, spawn_agent, wait_for
from test_child_restarts_e2e import scrape

__all__ = ["spawn_agent"]  # the fixture, used by name

UNIX_IDLE = 400
TCP_IDLE = 150


@contextlib.contextmanager
def idle_flood(agent: AgentProc) -> Iterator[None]:
    """Keeps UNIX_IDLE Unix and TCP_IDLE TCP connections open that never send a byte; the
    ones the servers close are replaced, so the pressure lasts for the whole test."""
    targets = [
        (socket.AF_UNIX, str(agent.run_dir / CONTROL_SOCKET), UNIX_IDLE),
        (socket.AF_INET, ("127.0.0.1", agent.port), TCP_IDLE),
    ]
    with IdleConnections(targets) as idle:
        deadline = time.monotonic() + 10
        while len(idle.held) < (UNIX_IDLE + TCP_IDLE) // 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(idle.held) >= (UNIX_IDLE + TCP_IDLE) // 2, "the idle connections did not open"
        yield
        assert len(idle.held) >= (UNIX_IDLE + TCP_IDLE) // 2, "the idle connections did not last"


def test_status_hooks_and_scrapes_succeed_among_hundreds_of_idle_connections(
    spawn_agent: Callable[..., AgentProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = spawn_agent({"GPUTEL_SIM_PATTERN": "0:3600"})
    monkeypatch.setenv("GPU_TELEMETRY_AUTOSTART", "1")
    for name, value in agent.env.items():
        if name.startswith("GPUTEL_"):
            monkeypatch.setenv(name, value)
    wait_for(lambda: scrape(agent), 10, "/metrics")  # bound a moment after the socket
    with idle_flood(agent):
        for i in range(15):
            reply = request(agent.run_dir, {"op": "status"}, timeout=1.0)
            assert reply["ok"] is True, reply
            created = hooks.allocation_created(f"job-{i}", gpus=[0])
            assert created.ok and created.action == "registered", created
            released = hooks.allocation_released(f"job-{i}")
            assert released.ok and released.action == "released", released
            with urllib.request.urlopen(
                f"http://127.0.0.1:{agent.port}/metrics", timeout=2
            ) as resp:
                assert resp.status == 200 and b"gputel_telemetry_active" in resp.read()
        cli = subprocess.run(
            [sys.executable, "-m", "gputel", "status", "--json"],
            env=agent.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["agent"] == "running"
    assert agent.status()["allocations"] == []
