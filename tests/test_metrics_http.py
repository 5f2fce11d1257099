"""The /metrics server: idle clients are cut off and cannot exhaust threads or descriptors."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from gputel.telemetry import metrics_http
from gputel.telemetry.metrics_http import MetricsServer


def test_idle_connections_are_capped_and_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_http, "MAX_CONNECTIONS", 4)
    monkeypatch.setattr(metrics_http._Handler, "timeout", 0.5)
    server = MetricsServer("127.0.0.1", 0, metrics=lambda: b"up 1\n", health=lambda: (True, "ok"))
    server.start()
    idle: list[socket.socket] = []
    try:
        before = threading.active_count()
        for _ in range(20):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=2))
        time.sleep(0.2)
        # At most 4 handlers, each with the timer that bounds its request.
        assert threading.active_count() <= before + 2 * 4
        time.sleep(0.8)  # the handlers' read timeout frees every slot
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.read() == b"up 1\n"
        assert threading.active_count() <= before + 1
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
        started = time.monotonic()
        closed = False
        for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
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
            if time.monotonic() - started > 5:
                break
        assert closed, "the server kept a drip-feeding client"
        assert time.monotonic() - started < 3
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
