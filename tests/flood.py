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


def _connect(family: int, address: object) -> socket.socket | None:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(address)  # type: ignore[arg-type]
    except OSError:  # a full backlog (EAGAIN on Unix sockets): try again on the next round
        s.close()
        return None
    return s


class IdleConnections:
    """Keeps connections open that never send a byte, to any mix of Unix and TCP addresses.

    ``targets`` is ``[(family, address, count), …]``. Connections the server closes (a reply or
    EOF waiting) are replaced every ``period`` seconds, so the pressure lasts as long as the
    ``with`` block; ``held`` is how many are open now and ``opened`` how many were opened in all.
    """

    def __init__(self, targets: list[tuple[int, object, int]], period: float = 0.1) -> None:
        self.targets, self.period = targets, period
        self.held: list[socket.socket] = []
        self.opened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            alive = []
            for s in self.held:
                try:
                    gone = s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    s.close()
                else:
                    alive.append(s)
            self.held[:] = alive
            for family, address, count in self.targets:
                mine = sum(1 for s in self.held if s.family == family)
                for _ in range(count - mine):
                    if (s := _connect(family, address)) is not None:
                        self.held.append(s)
                        self.opened += 1
            self._stop.wait(self.period)

    def __enter__(self) -> IdleConnections:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.held:
            s.close()
