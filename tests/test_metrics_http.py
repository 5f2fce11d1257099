"""The /metrics server: idle clients are cut off and cannot exhaust threads or descriptors."""

from __future__ import annotations

import contextlib
import itertools
import socket
import threading
import time
import urllib.request
from collections.abc import Callable

import pytest

from gputel.telemetry import metrics_http
from gputel.telemetry.metrics_http import MetricsServer


def handlers() -> int:
    """The server's request threads alive now (each handles one connection)."""
    return sum("process_request_thread" in t.name for t in threading.enumerate())


def wait_until(pred: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Wait for a state, not for a guessed duration: a loaded machine only makes it later."""
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_idle_connections_are_capped_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.5)
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: b"up 1\n", health=lambda: (True, "ok"))
    server.start()
    idle: list[socket.socket] = []
    try:
        assert handlers() == 0
        for _ in range(20):
            conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            conn.settimeout(30)
            idle.append(conn)
        # Every connection is either served (an idle handler, cut off by its timeout) or
        # refused at once; both end in EOF, and at most 4 are ever served at the same time.
        for conn in idle:
            assert handlers() <= 4
            with contextlib.suppress(ConnectionResetError):
                assert conn.recv(1) == b""
        wait_until(lambda: handlers() == 0, "the idle handlers to be cut off")
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.read() == b"up 1\n"
        wait_until(lambda: handlers() == 0, "the scrape's handler to end")
    finally:
        for s in idle:
            s.close()
        server.stop()


def test_a_client_dripping_bytes_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-read timeout alone lets a byte every few seconds hold a slot forever."""
    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.6)
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: b"up 1\n", health=lambda: (True, "ok"))
    server.start()
    try:
        conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        # Each byte comes well within the per-read timeout (0.2 s < 0.6 s) and the header
        # never ends, so only a deadline on the whole request closes this connection. The
        # 60 s give-up is far beyond that deadline, so a slow machine cannot fail the test.
        stream = itertools.chain(b"GET /metrics HTTP/1.1\r\n", itertools.cycle(b"X-Drip: y\r\n"))
        give_up = time.monotonic() + 60
        closed = False
        for byte in stream:
            try:
                conn.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            conn.settimeout(0.2)
            try:
                if conn.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except ConnectionResetError:
                closed = True
                break
            if time.monotonic() > give_up:
                break
        assert closed, "the server kept a drip-feeding client"
        conn.close()
    finally:
        server.stop()


def test_keep_alive_scrapes_still_work() -> None:
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: b"up 1\n", health=lambda: (True, "ok"))
    server.start()
    try:
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(3):
            conn.request("GET", "/metrics")
            assert conn.getresponse().read() == b"up 1\n"
        conn.close()
    finally:
        server.stop()
