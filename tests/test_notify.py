"""sd_notify against a real AF_UNIX datagram socket, on a fake clock."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gputel.supervisor.notify import Notifier, watchdog_interval


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(1.0)
    yield s, path
    s.close()


def drain(s: socket.socket) -> list[str]:
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        s.settimeout(1.0)
    return out


def test_noop_without_notify_socket() -> None:
    n = Notifier(env={})
    assert not n.enabled
    assert not n.ready() and not n.status("x") and not n.watchdog(1) and not n.stopping()
    assert n.next_ping_in() is None


def test_ready_status_stopping(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled and n.watchdog_interval_s is None
    assert n.ready("state idle")
    assert s.recv(4096) == b"READY=1\nSTATUS=state idle"
    assert not n.status("state idle")  # unchanged: nothing sent
    assert n.status("state active")
    assert s.recv(4096) == b"STATUS=state active"
    assert n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    n.close()


def test_watchdog_only_when_due_and_loop_advanced(listener: tuple[socket.socket, str]) -> None:
    s, path = listener
    clock = FakeClock()
    n = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    assert n.watchdog_interval_s == 1.0
    assert n.next_ping_in() == 0.0
    assert n.watchdog(1)
    assert drain(s) == ["WATCHDOG=1"]
    clock.t += 0.5
    assert not n.watchdog(2)  # not due yet
    clock.t += 0.6
    assert n.watchdog(3)
    assert drain(s) == ["WATCHDOG=1"]
    # A loop that stopped advancing (same counter) never pings, however long it has been.
    n2 = Notifier(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock=clock)
    drain(s)
    assert n2.watchdog(7)
    clock.t += 10
    assert not n2.watchdog(7)
    assert n2.watchdog(8)
    assert drain(s) == ["WATCHDOG=1", "WATCHDOG=1"]
    assert n2.next_ping_in() == pytest.approx(1.0)


def test_watchdog_for_another_pid_is_ignored(listener: tuple[socket.socket, str]) -> None:
    _s, path = listener
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    assert os.getpid() != 1
    assert Notifier(env=env).watchdog_interval_s is None
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_abstract_socket_name() -> None:
    name = f"gputel-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(1.0)
    try:
        n = Notifier(env={"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert s.recv(4096) == b"READY=1"
    finally:
        s.close()


def test_send_failure_is_logged_once_and_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "missing.sock")})
    assert not n.ready()
    assert not n.status("a")
    assert len([r for r in caplog.records if "sd_notify" in r.getMessage()]) == 1
