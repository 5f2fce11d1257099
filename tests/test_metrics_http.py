"""The /metrics server: idle clients are cut off and cannot exhaust threads or descriptors."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request

import pytest

from gputel import metrics_http
from gputel.metrics_http import MetricsServer


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
        assert threading.active_count() <= before + 4
        time.sleep(0.8)  # the handlers' read timeout frees every slot
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.read() == b"up 1\n"
        assert threading.active_count() <= before + 1
    finally:
        for s in idle:
            s.close()
        server.stop()
