"""The control socket over real Unix sockets: protocol, validation, safety and time bounds."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gputel.control.client import agent_answers, request
from gputel.control.protocol import (
    MAX_MESSAGE_BYTES,
    AgentTimeout,
    AgentUnavailable,
    ControlSocketInUse,
    RequestError,
    validate_request,
)
from gputel.control.server import ControlServer
from gputel.runtime import CONTROL_SOCKET


class Recorder:
    """A handler that remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, req: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(req)
        if req["op"] == "status":
            return {"agent": "running", "state": "idle"}
        if req["op"] == "release" and req["id"] == "boom":
            raise RuntimeError("kaboom\n  in the handler")
        if req["op"] == "release" and req["id"] == "refuse":
            raise RequestError("no such allocation")
        return {"echo": req}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir(mode=0o750)
    return d


@pytest.fixture
def server(run_dir: Path) -> Iterator[tuple[ControlServer, Recorder]]:
    handler = Recorder()
    srv = ControlServer(run_dir / CONTROL_SOCKET, handler, read_timeout=0.5)
    srv.start()
    yield srv, handler
    srv.stop()


def raw(path: Path, data: bytes, timeout: float = 3.0) -> dict[str, Any]:
    """Send raw bytes and read the one reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def test_round_trip(run_dir: Path, server: tuple[ControlServer, Recorder]) -> None:
    _, handler = server
    reply = request(run_dir, {"op": "status"})
    assert reply == {"ok": True, "agent": "running", "state": "idle"}
    reply = request(run_dir, {"op": "set_mode", "mode": "on", "for_s": 90})
    assert reply["ok"] is True
    assert reply["echo"] == {"op": "set_mode", "mode": "on", "for_s": 90.0}
    reply = request(run_dir, {"op": "allocate", "id": "job-1"})
    assert reply["echo"] == {"op": "allocate", "id": "job-1", "gpus": None, "pid": None}
    assert [c["op"] for c in handler.calls] == ["status", "set_mode", "allocate"]


def test_socket_mode_and_group(run_dir: Path, server: tuple[ControlServer, Recorder]) -> None:
    st = (run_dir / CONTROL_SOCKET).lstat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == run_dir.stat().st_gid
    assert [p.name for p in run_dir.iterdir()] == [CONTROL_SOCKET]  # no private dir left over


def test_stop_removes_socket(run_dir: Path) -> None:
    srv = ControlServer(run_dir / CONTROL_SOCKET, Recorder())
    srv.start()
    srv.stop()
    assert not (run_dir / CONTROL_SOCKET).exists()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"not json\n", "not valid JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b"\n", "empty request"),
        (b'{"op": "reboot"}\n', "unknown op"),
        (b'{"op": 5}\n', '"op"'),
        (b'{"mode": "on"}\n', '"op"'),
        (b'{"op": "set_mode"}\n', "mode"),
        (b'{"op": "set_mode", "mode": "sideways"}\n', "mode"),
        (b'{"op": "set_mode", "mode": "on", "for_s": "5m"}\n', "for_s"),
        (b'{"op": "set_mode", "mode": "on", "for_s": true}\n', "for_s"),
        (b'{"op": "set_mode", "mode": "on", "for_s": -1}\n', "for_s"),
        (b'{"op": "set_mode", "mode": "on", "for_s": 1e300}\n', "for_s"),
        (b'{"op": "set_mode", "mode": "auto", "for_s": 5}\n', "auto"),
        (b'{"op": "allocate"}\n', "id"),
        (b'{"op": "allocate", "id": 42}\n', "id"),
        (b'{"op": "allocate", "id": "j", "gpus": "0,1"}\n', "gpus"),
        (b'{"op": "allocate", "id": "j", "gpus": [0, true]}\n', "gpus"),
        (b'{"op": "allocate", "id": "j", "gpus": [0.5]}\n', "gpus"),
        (b'{"op": "allocate", "id": "j", "pid": "1"}\n', "pid"),
        (b'{"op": "release", "id": null}\n', "id"),
        (b'{"op": "status", "extra": 1}\n', "unknown field"),
        (b"\xff\xfe\n", "not valid JSON"),
        (b"[" * 100000 + b"\n", "longer than"),
    ],
)
def test_bad_requests_get_error_and_never_reach_handler(
    run_dir: Path, server: tuple[ControlServer, Recorder], data: bytes, needle: str
) -> None:
    _, handler = server
    reply = raw(run_dir / CONTROL_SOCKET, data)
    assert reply["ok"] is False
    assert needle in reply["error"]
    assert "\n" not in reply["error"]
    assert handler.calls == []


def test_oversized_line(run_dir: Path, server: tuple[ControlServer, Recorder]) -> None:
    _, handler = server
    big = json.dumps({"op": "release", "id": "x" * (MAX_MESSAGE_BYTES + 10)}).encode() + b"\n"
    reply = raw(run_dir / CONTROL_SOCKET, big)
    assert reply == {
        "ok": False,
        "error": f"request longer than {MAX_MESSAGE_BYTES} bytes",
        "code": "invalid",
    }
    assert handler.calls == []
    with pytest.raises(ValueError, match="longer than"):
        request(run_dir, {"op": "release", "id": "x" * (MAX_MESSAGE_BYTES + 10)})


def test_request_without_newline_is_accepted_at_eof(
    run_dir: Path, server: tuple[ControlServer, Recorder]
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(str(run_dir / CONTROL_SOCKET))
        s.sendall(b'{"op": "list"}')
        s.shutdown(socket.SHUT_WR)
        reply = json.loads(s.recv(65536))
    assert reply["ok"] is True


def test_handler_errors_become_replies(
    run_dir: Path, server: tuple[ControlServer, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    reply = request(run_dir, {"op": "release", "id": "boom"})
    assert reply["ok"] is False
    assert reply["error"] == "internal error in op release: RuntimeError: kaboom in the handler"
    assert reply["code"] == "internal"
    assert "kaboom" in caplog.text
    reply = request(run_dir, {"op": "release", "id": "refuse"})
    assert reply == {"ok": False, "error": "no such allocation", "code": "invalid"}
    assert request(run_dir, {"op": "status"})["ok"] is True  # still serving


def test_unserialisable_reply_is_an_error(run_dir: Path) -> None:
    with ControlServer(run_dir / CONTROL_SOCKET, lambda req: {"x": object()}):
        reply = request(run_dir, {"op": "list"})
    assert reply["ok"] is False and "serialisable" in reply["error"]


def test_silent_client_does_not_block_others(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    srv = ControlServer(path, Recorder(), read_timeout=1.5)
    srv.start()
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for s in silent:
            s.connect(str(path))
        start = time.monotonic()
        for _ in range(5):
            assert request(run_dir, {"op": "status"}, timeout=1.0)["ok"] is True
        assert time.monotonic() - start < 1.0  # below the 1.5 s read timeout of each silent one
        # The silent client is cut off after the read timeout, with an error reply.
        silent[0].settimeout(3)
        reply = json.loads(silent[0].recv(65536))
        assert reply["ok"] is False and "within" in reply["error"]
    finally:
        for s in silent:
            s.close()
        srv.stop()


def test_dripping_client_is_cut_off_by_total_deadline(
    run_dir: Path, server: tuple[ControlServer, Recorder]
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect(str(run_dir / CONTROL_SOCKET))
        start = time.monotonic()
        reply = None
        for ch in b'{"op": "status"':
            try:
                s.send(bytes([ch]))
            except OSError:
                break
            time.sleep(0.1)
            s.setblocking(False)
            try:
                reply = s.recv(65536)
                break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
                s.settimeout(3)
        assert reply is not None
        assert json.loads(reply)["ok"] is False
        assert time.monotonic() - start < 1.5


def test_idle_connection_makes_way_for_a_real_client(run_dir: Path) -> None:
    """At the connection cap, the connection that waited longest for its request goes."""
    with ControlServer(run_dir / CONTROL_SOCKET, Recorder(), max_connections=1, read_timeout=5):
        path = run_dir / CONTROL_SOCKET
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hog:
            hog.connect(str(path))
            time.sleep(0.05)
            reply = request(run_dir, {"op": "status"})
            assert reply["ok"] is True
            hog.settimeout(2)
            evicted = json.loads(hog.recv(65536))
        assert evicted["ok"] is False and evicted["code"] == "busy"


def test_requests_beyond_the_pending_limit_are_answered_busy(run_dir: Path) -> None:
    release = threading.Event()

    def slow(req: dict[str, Any]) -> dict[str, Any]:
        release.wait(5)
        return {}

    with ControlServer(run_dir / CONTROL_SOCKET, slow, max_pending=1):
        first: list[dict[str, Any]] = []
        t = threading.Thread(target=lambda: first.append(request(run_dir, {"op": "list"})))
        t.start()
        try:
            time.sleep(0.2)
            reply = request(run_dir, {"op": "list"})
            assert reply["ok"] is False and reply["code"] == "busy"
        finally:
            release.set()
            t.join()
        assert first == [{"ok": True}]


def connect_idle(path: Path) -> socket.socket:
    """A client that connects and sends nothing (retrying while the backlog is full)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    deadline = time.monotonic() + 5
    while True:
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_hundreds_of_idle_connections_cost_real_clients_nothing(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    with ControlServer(path, Recorder()):
        idle: list[socket.socket] = []
        try:
            for _ in range(600):  # more than the connection cap: they push each other out
                idle.append(connect_idle(path))
            for _ in range(50):
                reply = request(run_dir, {"op": "status"}, timeout=1.0)
                assert reply["ok"] is True
        finally:
            for s in idle:
                s.close()


def test_concurrent_clients(run_dir: Path, server: tuple[ControlServer, Recorder]) -> None:
    results: list[bool] = []

    def one() -> None:
        results.append(request(run_dir, {"op": "list"}, timeout=3)["ok"])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 20


def test_missing_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable) as info:
        request(tmp_path, {"op": "status"})
    assert info.value.reason == "missing"
    assert "no control socket" in str(info.value)
    assert not agent_answers(tmp_path)


def test_stale_socket_is_refused_then_replaced(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # bound, never listening: what a killed agent leaves behind
    with pytest.raises(AgentUnavailable) as info:
        request(run_dir, {"op": "status"})
    assert info.value.reason == "refused"
    with ControlServer(path, Recorder()):
        assert request(run_dir, {"op": "status"})["ok"] is True


def test_live_socket_is_not_stolen(run_dir: Path, server: tuple[ControlServer, Recorder]) -> None:
    with pytest.raises(ControlSocketInUse):
        ControlServer(run_dir / CONTROL_SOCKET, Recorder()).start()
    assert request(run_dir, {"op": "status"})["ok"] is True


def test_non_socket_is_not_replaced(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    path.write_text("precious")
    with pytest.raises(OSError, match="not a socket"):
        ControlServer(path, Recorder()).start()
    assert path.read_text() == "precious"


def test_stop_leaves_a_newer_agents_socket(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    old = ControlServer(path, Recorder())
    old.start()
    os.unlink(path)
    with ControlServer(path, Recorder()):
        old.stop()
        assert request(run_dir, {"op": "status"})["ok"] is True


#: Runs as root, imports while it still may read the venv, then becomes ``nobody`` (no groups) and
#: asks the agent in argv[1]; prints the reply, or the AgentUnavailable it met, as JSON.
_AS_NOBODY = """
import json, os, sys
from pathlib import Path
from gputel.control.protocol import AgentUnavailable
from gputel.control.client import request
try:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
except OSError as exc:
    print(json.dumps({"cannot_drop": str(exc)}))
    sys.exit(0)
try:
    print(json.dumps({"reply": request(Path(sys.argv[1]), {"op": "status"})}))
except AgentUnavailable as exc:
    print(json.dumps({"reason": exc.reason, "message": str(exc)}))
"""


def _request_as_nobody(run_dir: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", _AS_NOBODY, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env=dict(os.environ, HOME="/"),
    )
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    if "cannot_drop" in answer:
        pytest.skip(f"root here cannot become nobody: {answer['cannot_drop']}")
    return answer


def _denied_in_process(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONTROL_SOCKET
    with ControlServer(path, Recorder()):
        os.chmod(path, 0o000)
        with pytest.raises(AgentUnavailable) as info:
            request(run_dir, {"op": "status"})
    return {"reason": info.value.reason, "message": str(info.value)}


def test_permission_denied_names_the_fix() -> None:
    """A caller who may not reach the socket is told so, and how to fix it.

    Root ignores file permissions, so as root the caller is a child that became ``nobody``,
    facing a run directory only root can traverse (what /run/gputel is to a stranger); the
    same child, once the directory is opened to it, gets an answer, so the denial is the
    directory's and not a broken child. Not as root, the socket's own mode denies us.
    """
    if os.geteuid() != 0:
        with tempfile.TemporaryDirectory() as base:
            run_dir = Path(base) / "run"
            run_dir.mkdir()
            denied = _denied_in_process(run_dir)
        assert denied["reason"] == "permission"
        assert "permission denied" in denied["message"] and "join group" in denied["message"]
        return
    # Not under tmp_path: pytest's base directory is root-only already, and the run directory
    # itself must be what denies the caller.
    with tempfile.TemporaryDirectory() as base:
        os.chmod(base, 0o755)
        run_dir = Path(base) / "run"
        run_dir.mkdir(mode=0o700)
        path = run_dir / CONTROL_SOCKET
        with ControlServer(path, Recorder()):
            denied = _request_as_nobody(run_dir)
            os.chmod(run_dir, 0o755)
            os.chmod(path, 0o666)
            allowed = _request_as_nobody(run_dir)
    assert denied["reason"] == "permission", denied
    message = denied["message"]
    assert message.startswith(f"permission denied on {path}: "), message
    assert "run as root or join group" in message
    assert allowed["reply"]["ok"] is True, allowed


def test_request_is_bounded_against_a_mute_listener(run_dir: Path) -> None:
    """A socket that accepts and never answers: AgentTimeout, within the timeout."""
    path = run_dir / CONTROL_SOCKET
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(1)
    try:
        start = time.monotonic()
        with pytest.raises(AgentTimeout):
            request(run_dir, {"op": "status"}, timeout=0.3)
        assert time.monotonic() - start < 0.6
        assert agent_answers(run_dir, timeout=0.2)  # someone is there: do not start another
    finally:
        mute.close()


def test_request_is_bounded_against_a_full_backlog(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(0)
    held: list[socket.socket] = []
    try:
        for _ in range(4):  # fill the backlog; further connects block
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                s.close()
                break
            held.append(s)
        start = time.monotonic()
        with pytest.raises(AgentTimeout):
            request(run_dir, {"op": "status"}, timeout=0.3)
        assert time.monotonic() - start < 0.6
    finally:
        for s in held:
            s.close()
        mute.close()


def test_agent_closing_without_reply_is_unavailable(run_dir: Path) -> None:
    path = run_dir / CONTROL_SOCKET
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def close_at_once() -> None:
        conn, _ = listener.accept()
        conn.recv(100)
        conn.close()

    t = threading.Thread(target=close_at_once)
    t.start()
    try:
        with pytest.raises(AgentUnavailable, match="without answering"):
            request(run_dir, {"op": "status"}, timeout=2)
    finally:
        t.join()
        listener.close()


def test_validate_request_fills_defaults() -> None:
    assert validate_request({"op": "set_mode", "mode": "off"}) == {
        "op": "set_mode",
        "mode": "off",
        "for_s": None,
    }
    assert validate_request({"op": "allocate", "id": "a", "gpus": [0, 1], "pid": 7}) == {
        "op": "allocate",
        "id": "a",
        "gpus": [0, 1],
        "pid": 7,
    }
    assert validate_request({"op": "list"}) == {"op": "list"}


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(OSError, match="longer than 107 bytes"):
        ControlServer(deep / CONTROL_SOCKET, Recorder()).start()


def test_missing_run_dir_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        ControlServer(tmp_path / "nope" / CONTROL_SOCKET, Recorder()).start()
    assert "nope" in str(info.value)
