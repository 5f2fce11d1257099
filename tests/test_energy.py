"""The one energy rule: counter deltas (with wrap), trapezoids only without a counter and never
across a gap, re-basing to "since the file began"."""

from __future__ import annotations

import pytest

from gputel.energy import PowerIntegrator, SinceStart, counter_delta, energy_between


def test_counter_delta() -> None:
    assert counter_delta(10.0, 12.5) == 2.5
    assert counter_delta(10.0, 10.0) == 0.0
    assert counter_delta(None, 1.0) is None and counter_delta(1.0, None) is None
    assert counter_delta(10.0, 4.0) is None  # backwards, no known wrap: unknown, not negative
    assert counter_delta(90.0, 5.0, wrap=100.0) == 15.0  # one wrap undone
    assert counter_delta(90.0, 95.0, wrap=100.0) == 5.0
    assert counter_delta(90.0, 5.0, wrap=50.0) is None  # not explainable by one wrap


def test_energy_between_snapshots() -> None:
    assert energy_between({0: 1.0, 1: 2.0}, {0: 3.5, 1: 2.0}, [0, 1]) == 2.5
    assert energy_between({0: 5.0}, {0: 4.0}, [0]) is None
    assert energy_between({}, {0: 4.0}, [0]) is None
    assert energy_between({0: 1.0, 1: 1.0}, {0: 2.0}, [0, 1]) is None  # never a partial sum
    assert energy_between({0: 1.0}, {0: 2.0}, []) is None
    assert energy_between({0: float("nan")}, {0: 2.0}, [0]) is None


def test_trapezoid_and_gaps() -> None:
    p = PowerIntegrator()
    assert p.add(10.0, 100.0) == 0.0
    assert p.add(11.0, 200.0) == 150.0
    assert p.add(13.0, 200.0) == 550.0
    assert p.add(14.0, None) is None  # unknown at a missing sample
    assert p.add(16.0, 100.0) == 550.0  # never bridges the gap
    assert p.add(17.0, 100.0) == 650.0
    p.gap()
    assert p.add(20.0, 300.0) == 650.0
    assert p.add(20.0, 300.0) == 650.0  # no time passed
    assert PowerIntegrator().add(0.0, None) is None


def test_since_start_rebases_and_survives_missing_and_backwards_readings() -> None:
    s = SinceStart()
    assert s.add(None) is None
    assert s.add(1000.0) == 0.0
    assert s.add(1250.5) == 250.5
    assert s.add(None) is None  # a missing reading: empty, not a number
    assert s.add(1300.5) == 300.5  # the counter spans the gap
    assert s.add(5.0) == 300.5  # driver reload: that interval adds nothing
    assert s.add(7.0) == 302.5


def test_since_start_with_wrap() -> None:
    s = SinceStart(wrap=1000.0)
    assert s.add(990.0) == 0.0
    assert s.add(10.0) == pytest.approx(20.0)


def test_a_restarted_counter_counts_that_tick_power_times_the_interval() -> None:
    from gputel.energy import SinceStart, tick_energy

    assert tick_energy(100.0, 130.0, 250.0, 0.5) == 30.0
    assert tick_energy(900.0, 10.0, 250.0, 0.5) == 125.0
    assert tick_energy(900.0, 10.0, None, 0.5) is None
    since = SinceStart()
    values = [
        since.add(raw, t, p)
        for raw, t, p in ((1000.0, 0.0, 300.0), (1300.0, 1.0, 300.0), (5.0, 2.0, 310.0))
    ]
    assert values == [0.0, 300.0, 610.0]
