"""The hook client's one retry rule, against the real control server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from gputel.control.hook_client import exchange
from gputel.control.protocol import AgentUnavailable, ErrorCode, RequestError
from gputel.control.server import ControlServer
from gputel.runtime import CONTROL_SOCKET


class Refusing:
    """Refuses the first ``times`` requests with ``code``, then answers."""

    def __init__(self, code: ErrorCode, times: int) -> None:
        self.code = code
        self.times = times
        self.calls = 0

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.calls <= self.times:
            raise RequestError(f"refused ({self.code.value})", self.code)
        return {"created": True}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return run


MESSAGE = {"op": "allocate", "id": "job-1", "gpus": None, "pid": None}


@pytest.mark.parametrize("code", [ErrorCode.STARTING, ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN])
def test_retryable_codes_are_asked_again(run_dir: Path, code: ErrorCode) -> None:
    handler = Refusing(code, 3)
    with ControlServer(run_dir / CONTROL_SOCKET, handler):
        done = exchange(run_dir, MESSAGE, time.monotonic() + 30)
    assert done.reply == {"ok": True, "created": True}
    assert handler.calls == 4 and done.started is None


def test_a_request_to_fix_is_not_asked_again(run_dir: Path) -> None:
    handler = Refusing(ErrorCode.INVALID, 3)
    with ControlServer(run_dir / CONTROL_SOCKET, handler):
        done = exchange(run_dir, MESSAGE, time.monotonic() + 30)
    assert done.reply is not None and done.reply["code"] == "invalid"
    assert handler.calls == 1


def test_the_last_refusal_is_returned_at_the_deadline(run_dir: Path) -> None:
    handler = Refusing(ErrorCode.STARTING, 10**6)
    with ControlServer(run_dir / CONTROL_SOCKET, handler):
        done = exchange(run_dir, MESSAGE, time.monotonic() + 0.3)
    assert done.reply is not None and done.reply["code"] == "starting"
    assert handler.calls >= 2


def test_no_agent_is_started_once_then_asked_until_it_answers(run_dir: Path) -> None:
    server = ControlServer(run_dir / CONTROL_SOCKET, Refusing(ErrorCode.STARTING, 1))
    starts: list[float] = []

    def start(deadline: float) -> str:
        starts.append(deadline)
        server.start()
        return "started for the test"

    try:
        done = exchange(run_dir, MESSAGE, time.monotonic() + 30, start=start)
    finally:
        server.stop()
    assert len(starts) == 1
    assert done.reply == {"ok": True, "created": True} and done.started == "started for the test"


def test_no_agent_without_start_is_reported(run_dir: Path) -> None:
    done = exchange(run_dir, MESSAGE, time.monotonic() + 30)
    assert done.reply is None and isinstance(done.unavailable, AgentUnavailable)
    assert done.unavailable.no_agent


def test_a_stale_socket_is_asked_again_until_the_agent_is_back(run_dir: Path) -> None:
    """An agent restarting: its old socket refuses connections until the new one binds."""
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(run_dir / CONTROL_SOCKET))
    stale.close()  # bound, never listening: connections are refused
    server = ControlServer(run_dir / CONTROL_SOCKET, Refusing(ErrorCode.BUSY, 1))
    timer = threading.Timer(0.3, server.start)
    timer.start()
    try:
        done = exchange(run_dir, MESSAGE, time.monotonic() + 2.0)
    finally:
        timer.join()
        server.stop()
    assert done.reply == {"ok": True, "created": True}


def test_a_connection_closed_without_answer_is_asked_again(run_dir: Path) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / CONTROL_SOCKET))
    listener.listen(8)

    def serve() -> None:
        conn, _ = listener.accept()  # the first one is closed unanswered
        conn.close()
        conn, _ = listener.accept()
        conn.recv(4096)
        conn.sendall(b'{"ok": true, "created": true}\n')
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    try:
        done = exchange(run_dir, MESSAGE, time.monotonic() + 2.0)
    finally:
        t.join()
        listener.close()
    assert done.reply == {"ok": True, "created": True}
