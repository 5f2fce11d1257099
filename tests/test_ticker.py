"""Ticks land on absolute deadlines; overruns skip and count deadlines instead of bursting."""

from __future__ import annotations

import os
import signal
import time

import pytest

from gputel.ticker import Ticker, Waker


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.t

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        self.t += timeout
        return False


def test_ticks_on_absolute_deadlines_without_drift() -> None:
    clock = FakeClock()
    ticker = Ticker(0.5, clock=clock, wait=clock.wait)
    times = []
    for expected in range(20):
        assert ticker.next() == expected
        times.append(clock.t)
        clock.t += 0.123  # work inside the tick never shifts the grid
    assert times == [pytest.approx(100.0 + 0.5 * k) for k in range(20)]
    assert ticker.missed == 0


def test_overrun_skips_missed_deadlines_and_counts_them() -> None:
    clock = FakeClock(0.0)
    ticker = Ticker(1.0, clock=clock, wait=clock.wait)
    assert ticker.next() == 0
    clock.t += 3.5  # tick 0 took 3.5 intervals: deadlines 1, 2, 3 are gone
    assert ticker.next() == 4
    assert clock.t == pytest.approx(4.0)
    assert ticker.missed == 3
    assert ticker.next() == 5
    assert clock.t == pytest.approx(5.0)
    assert ticker.missed == 3


def test_no_catch_up_burst_after_a_long_stall() -> None:
    clock = FakeClock(0.0)
    ticker = Ticker(0.1, clock=clock, wait=clock.wait)
    ticker.next()
    clock.t += 60.0
    ticks = [ticker.next() for _ in range(3)]
    stamps = []
    for _ in range(3):
        ticker.next()
        stamps.append(clock.t)
    assert ticks == [601, 602, 603]
    assert stamps[1] - stamps[0] == pytest.approx(0.1)
    assert ticker.missed == 600


def test_woken_wait_returns_none_and_resumes_the_same_deadline() -> None:
    clock = FakeClock(0.0)
    wakes = [True]

    def wait(timeout: float) -> bool:
        if wakes:
            clock.t += timeout / 2
            return wakes.pop()
        clock.t += timeout
        return False

    ticker = Ticker(1.0, clock=clock, wait=wait)
    assert ticker.next() == 0
    assert ticker.next() is None
    assert clock.t == pytest.approx(0.5)
    assert ticker.next() == 1
    assert clock.t == pytest.approx(1.0)
    assert ticker.missed == 0


def test_rejects_non_positive_interval() -> None:
    with pytest.raises(ValueError):
        Ticker(0.0)


def test_waker_is_interrupted_by_a_signal_handler() -> None:
    waker = Waker()
    old = signal.signal(signal.SIGUSR1, lambda s, f: waker.wake())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        signal.signal(signal.SIGALRM, lambda s, f: os.kill(os.getpid(), signal.SIGUSR1))
        start = time.monotonic()
        assert waker.wait(5.0) is True
        assert time.monotonic() - start < 2.0
        assert waker.wait(0.0) is False
    finally:
        signal.signal(signal.SIGUSR1, old)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        waker.close()
