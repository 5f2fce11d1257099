"""Hundreds of idle connections to a port, for the ``/metrics`` server's test and benchmark."""

from __future__ import annotations

import socket
import threading


class Flood:
    """Keeps hundreds of connections open to a port: silent ones and half-sent requests."""

    def __init__(self, port: int, size: int = 400) -> None:
        self.port, self.size = port, size
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        socks: list[socket.socket] = []
        while not self._stop.is_set():
            for i in range(50):
                try:
                    s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                    if i % 2:
                        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Half: ")
                except OSError:
                    continue
                socks.append(s)
                self.opened += 1
            while len(socks) > self.size:
                socks.pop(0).close()
            self._stop.wait(0.1)
        for s in socks:
            s.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def __enter__(self) -> Flood:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
