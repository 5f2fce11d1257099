"""A port held by another process before the agent starts: said loudly, retried, then served."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable

from test_agent_e2e import AgentProc, free_port, spawn_agent, wait_for

__all__ = ["spawn_agent"]  # the fixture, used by name


def test_squatted_port_is_reported_and_taken_once_free(
    spawn_agent: Callable[..., AgentProc],
) -> None:
    port = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", port))
    squatter.listen(8)
    try:
        agent = spawn_agent({"GPUTEL_EXPORTER_PORT": str(port)})
        agent.port = port
        # The control socket answers a moment before the exporter is tried.
        status = wait_for(
            lambda: (st := agent.status())["exporter_error"] and st, 10, "the exporter error"
        )
        where = f"127.0.0.1:{port}"
        assert status["agent"] == "running" and status["exporter"] is None
        assert where in status["exporter_error"], status
        assert "/metrics" in status["exporter_error"]
        wait_for(lambda: "cannot serve /metrics" in agent.stderr(), 5, "the error in the log")
        log = agent.stderr()
        assert log.count("cannot serve /metrics") == 1 and where in log
        shown = subprocess.run(
            [sys.executable, "-m", "gputel", "status"],
            env={**agent.env, "COLUMNS": "200"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert shown.returncode == 0, shown.stderr
        assert f"exporter: cannot serve /metrics on {where}" in shown.stdout, shown.stdout
    finally:
        squatter.close()
    # Port free again: the agent binds it at its next try and says so.
    wait_for(lambda: agent.status()["exporter"] == where, 15, "the agent to take the port")
    assert agent.status()["exporter_error"] is None
    with urllib.request.urlopen(f"http://{where}/metrics", timeout=2) as resp:
        assert b"gputel_telemetry_active" in resp.read()
    assert agent.stderr().count("cannot serve /metrics") == 1  # one error, however many tries
    assert "serving /metrics on" in agent.stderr()
