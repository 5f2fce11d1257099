"""Drift-free ticks on the monotonic clock.

Deadlines are absolute (``t0 + k * interval``), so a slow tick never shifts the ones after it and
a day of 1 s ticks stays on the same grid. A tick that overruns its interval skips the deadlines it
missed and counts them: a catch-up burst would write rows that all describe the same moment.

Waiting goes through an injected ``wait(timeout) -> bool`` so tests run on a fake clock and the
recorder can wake early on a signal (see :class:`Waker`).
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import time
from collections.abc import Callable

Clock = Callable[[], float]
WaitFn = Callable[[float], bool]
"""Wait up to ``timeout`` seconds; return True when woken early (stop, reload)."""


def sleep_wait(timeout: float) -> bool:
    """A wait that cannot be interrupted; enough where nothing needs to wake the loop early."""
    if timeout > 0:
        time.sleep(timeout)
    return False


class Ticker:
    """Hands out tick numbers at absolute deadlines, skipping (and counting) overrun ones."""

    def __init__(
        self,
        interval_s: float,
        *,
        clock: Clock = time.monotonic,
        wait: WaitFn = sleep_wait,
        t0: float | None = None,
    ) -> None:
        if not interval_s > 0:
            raise ValueError("interval must be > 0")
        self.interval_s = interval_s
        self._clock = clock
        self._wait = wait
        self.t0 = clock() if t0 is None else t0
        self._next = 0
        self.missed = 0
        """Deadlines skipped because the previous tick was still running."""

    def deadline(self, k: int) -> float:
        return self.t0 + k * self.interval_s

    def next(self) -> int | None:
        """Block until the next deadline and return its tick number.

        Returns None when the wait was woken early; calling again keeps waiting for the same
        deadline, so the caller can handle a signal and carry on without drifting.
        """
        now = self._clock()
        target = self.deadline(self._next)
        if now > target and self._next > 0:
            # Overrun: the next deadline still in the future, never the ones already past.
            k = math.floor((now - self.t0) / self.interval_s) + 1
            self.missed += k - self._next
            self._next = k
            target = self.deadline(k)
        while now < target:
            if self._wait(target - now):
                return None
            now = self._clock()
        k = self._next
        self._next += 1
        return k


class Waker:
    """A wait function that a signal handler can interrupt (self-pipe).

    ``threading.Event`` is not safe to set from a signal handler in the thread that waits on it;
    a pipe written by the handler and watched by ``select`` is.
    """

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._w, b"\0")

    def wait(self, timeout: float) -> bool:
        ready, _, _ = select.select([self._r], [], [], max(0.0, timeout))
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while os.read(self._r, 512):
                pass
        return True

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)
