"""sd_notify for ``Type=notify`` units: READY, STATUS, WATCHDOG and STOPPING.

A direct datagram send rather than libsystemd, so the agent needs no C library and works with
abstract (``@name``) sockets. Without ``NOTIFY_SOCKET`` every call is a cheap no-op, so the same
code runs under systemd, in a terminal and in tests.

Watchdog pings come from the agent's loop thread, and only when that loop has advanced since the
previous ping: a loop that stops turning stops pinging, and systemd restarts the service. A
background thread that pinged on a timer would keep a hung agent alive forever.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

#: Variables a child must not inherit: systemd would take its messages for the agent's.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _socket_address(raw: str) -> str | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None


def watchdog_interval(env: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``); None when no watchdog is asked."""
    usec = env.get("WATCHDOG_USEC", "").strip()
    if not usec.isdigit() or int(usec) <= 0:
        return None
    wd_pid = env.get("WATCHDOG_PID", "").strip()
    if wd_pid and wd_pid.isdigit() and int(wd_pid) != (os.getpid() if pid is None else pid):
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """Talks to the service manager named by ``NOTIFY_SOCKET``; silent when there is none."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._clock = clock
        self._sock: socket.socket | None = None
        self._failed_once = False
        self._last_status: str | None = None
        self.watchdog_interval_s = watchdog_interval(env) if self._address else None
        self._last_ping_at: float | None = None
        self._last_ping_progress: int | None = None
        if self._address:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            except OSError as exc:
                log.warning("sd_notify disabled: cannot create a datagram socket: %s", exc)
                self._sock = None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, message: str) -> bool:
        """One datagram; a failure is logged once and never raised (notify must not stop us)."""
        if self._sock is None or self._address is None:
            return False
        try:
            self._sock.sendto(message.encode(), self._address)
            return True
        except OSError as exc:
            if not self._failed_once:
                self._failed_once = True
                log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        if status is not None:
            self._last_status = status
            return self.send(f"READY=1\nSTATUS={status}")
        return self.send("READY=1")

    def status(self, text: str) -> bool:
        """Send ``STATUS=`` only when the line changed, so an idle agent sends nothing."""
        if text == self._last_status:
            return False
        self._last_status = text
        return self.send(f"STATUS={text}")

    def watchdog(self, progress: int) -> bool:
        """Ping if half a period passed and ``progress`` (the loop counter) moved since the last."""
        if self.watchdog_interval_s is None or self._sock is None:
            return False
        if progress == self._last_ping_progress:
            return False
        now = self._clock()
        if self._last_ping_at is not None and now - self._last_ping_at < self.watchdog_interval_s:
            return False
        self._last_ping_at = now
        self._last_ping_progress = progress
        return self.send("WATCHDOG=1")

    def next_ping_in(self) -> float | None:
        """Seconds until a ping is due (for the loop's sleep), or None without a watchdog."""
        if self.watchdog_interval_s is None or self._sock is None:
            return None
        if self._last_ping_at is None:
            return 0.0
        return max(0.0, self._last_ping_at + self.watchdog_interval_s - self._clock())

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
