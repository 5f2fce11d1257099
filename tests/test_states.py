"""The pure activity state machine: every transition by table, and a no-flapping property."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gputel.supervisor.states import (
    ActivityState,
    Machine,
    Mode,
    Thresholds,
    step,
    telemetry_wanted,
)

S = ActivityState
TH = Thresholds(start_util_pct=20, start_seconds=5, stop_util_pct=10, stop_seconds=15)


# (state, since, util, now) -> (new state, new since, transition?)
CASES = [
    # idle
    (S.IDLE, 0, None, 10, S.IDLE, 0, False),
    (S.IDLE, 0, 0, 10, S.IDLE, 0, False),
    (S.IDLE, 0, 19.9, 10, S.IDLE, 0, False),
    (S.IDLE, 0, 20, 10, S.ARMING, 10, True),
    (S.IDLE, 0, 100, 10, S.ARMING, 10, True),
    # arming
    (S.ARMING, 10, 50, 12, S.ARMING, 10, False),
    (S.ARMING, 10, 20, 14.99, S.ARMING, 10, False),
    (S.ARMING, 10, 20, 15, S.ACTIVE, 15, True),
    (S.ARMING, 10, 90, 40, S.ACTIVE, 40, True),
    (S.ARMING, 10, 19.9, 12, S.IDLE, 12, True),
    (S.ARMING, 10, 15, 15, S.IDLE, 15, True),  # in the band: below start_util, so not armed
    (S.ARMING, 10, None, 12, S.IDLE, 12, True),
    # active
    (S.ACTIVE, 15, 50, 100, S.ACTIVE, 15, False),
    (S.ACTIVE, 15, 10, 100, S.ACTIVE, 15, False),  # at stop_util is not below it
    (S.ACTIVE, 15, 15, 100, S.ACTIVE, 15, False),  # the hysteresis band
    (S.ACTIVE, 15, None, 100, S.ACTIVE, 15, False),
    (S.ACTIVE, 15, 9.9, 100, S.COOLING, 100, True),
    (S.ACTIVE, 15, 0, 100, S.COOLING, 100, True),
    # cooling
    (S.COOLING, 100, 5, 110, S.COOLING, 100, False),
    (S.COOLING, 100, 0, 114.99, S.COOLING, 100, False),
    (S.COOLING, 100, 0, 115, S.IDLE, 115, True),
    (S.COOLING, 100, 9, 500, S.IDLE, 500, True),
    (S.COOLING, 100, 10, 110, S.ACTIVE, 110, True),
    (S.COOLING, 100, 15, 120, S.ACTIVE, 120, True),  # back in the band: not quiet, reset
    (S.COOLING, 100, None, 110, S.ACTIVE, 110, True),
]


@pytest.mark.parametrize(("state", "since", "util", "now", "to", "to_since", "moved"), CASES)
def test_step_table(
    state: ActivityState,
    since: float,
    util: float | None,
    now: float,
    to: ActivityState,
    to_since: float,
    moved: bool,
) -> None:
    machine, transition = step(Machine(state, since), util, now, TH)
    assert machine == Machine(to, to_since)
    if moved:
        assert transition is not None
        assert (transition.from_state, transition.to_state, transition.at) == (state, to, now)
        assert transition.reason
        assert "\n" not in transition.reason
    else:
        assert transition is None


def test_zero_durations_skip_arming_and_cooling() -> None:
    th = Thresholds(start_util_pct=20, start_seconds=0, stop_util_pct=10, stop_seconds=0)
    m, t = step(Machine(S.IDLE, 0), 30, 1, th)
    assert m.state is S.ACTIVE and t is not None and t.from_state is S.IDLE
    m, t = step(m, 5, 2, th)
    assert m.state is S.IDLE and t is not None and t.from_state is S.ACTIVE


def test_reasons_name_the_thresholds() -> None:
    _, t = step(Machine(S.ARMING, 0), 30, 5, TH)
    assert t is not None and "20%" in t.reason and "5s" in t.reason
    _, t = step(Machine(S.COOLING, 0), 1, 15, TH)
    assert t is not None and "10%" in t.reason and "15s" in t.reason


def test_thresholds_refuse_impossible_settings() -> None:
    with pytest.raises(ValueError):
        Thresholds(start_util_pct=10, stop_util_pct=20)
    with pytest.raises(ValueError):
        Thresholds(start_seconds=-1)


@pytest.mark.parametrize(
    ("state", "mode", "allocations", "wanted"),
    [
        (S.IDLE, Mode.AUTO, 0, False),
        (S.ARMING, Mode.AUTO, 0, False),
        (S.ACTIVE, Mode.AUTO, 0, True),
        (S.COOLING, Mode.AUTO, 0, True),
        (S.IDLE, Mode.AUTO, 1, True),
        (S.ARMING, Mode.AUTO, 3, True),
        (S.IDLE, Mode.ON, 0, True),
        (S.ACTIVE, Mode.ON, 2, True),
        (S.ACTIVE, Mode.OFF, 0, False),
        (S.COOLING, Mode.OFF, 0, False),
        (S.IDLE, Mode.OFF, 5, False),  # off wins even over open allocations
    ],
)
def test_telemetry_wanted(state: ActivityState, mode: Mode, allocations: int, wanted: bool) -> None:
    result, reason = telemetry_wanted(state, mode, allocations)
    assert result is wanted
    assert reason


@pytest.mark.parametrize(
    ("state", "mode", "allocations", "wanted", "reason"),
    [
        (S.IDLE, Mode.AUTO, 0, True, "capture after Xid 79 on GPU 0"),
        (S.ACTIVE, Mode.AUTO, 2, True, "capture after Xid 79 on GPU 0"),
        (S.IDLE, Mode.ON, 0, True, "operator mode on"),
        (S.ACTIVE, Mode.OFF, 1, False, "operator mode off"),  # off wins over a capture too
    ],
)
def test_a_capture_forces_telemetry_on_unless_the_operator_says_otherwise(
    state: ActivityState, mode: Mode, allocations: int, wanted: bool, reason: str
) -> None:
    capture = "capture after Xid 79 on GPU 0"
    assert telemetry_wanted(state, mode, allocations, capture) == (wanted, reason)


# ---------------------------------------------------------------------------------- property
utils = st.one_of(st.none(), st.floats(min_value=0, max_value=100, allow_nan=False))
gaps = st.floats(min_value=0.0, max_value=20.0, allow_nan=False)
thresholds = st.builds(
    lambda start, stop, start_s, stop_s: Thresholds(
        max(start, stop), start_s, min(start, stop), stop_s
    ),
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.floats(min_value=0, max_value=100, allow_nan=False),
    st.floats(min_value=0, max_value=30, allow_nan=False),
    st.floats(min_value=0, max_value=30, allow_nan=False),
)


@settings(max_examples=300, deadline=None)
@given(th=thresholds, readings=st.lists(st.tuples(gaps, utils), min_size=1, max_size=80))
def test_never_flaps_faster_than_its_durations(
    th: Thresholds, readings: list[tuple[float, float | None]]
) -> None:
    """Idle→active needs start_seconds of continuous load; active→idle needs stop_seconds of quiet.

    Every path into ACTIVE from IDLE passes through ARMING (unless start_seconds is 0) and spends at
    least start_seconds with every reading >= start_util; every path from ACTIVE to IDLE spends at
    least stop_seconds in COOLING with every reading < stop_util. So between the last moment the
    machine left IDLE and entering ACTIVE, at least start_seconds pass, and between entering
    COOLING for the last time and entering IDLE, at least stop_seconds pass.
    """
    machine = Machine(S.IDLE, 0.0)
    now = 0.0
    left_idle_at: float | None = None
    entered_cooling_at: float | None = None
    states = [machine.state]
    for gap, util in readings:
        now += gap
        machine, t = step(machine, util, now, th)
        states.append(machine.state)
        if t is None:
            continue
        assert t.at == now and machine.since == now
        if t.from_state is S.IDLE:
            left_idle_at = now
        if t.to_state is S.COOLING:
            entered_cooling_at = now
        if t.to_state is S.ACTIVE and t.from_state in (S.IDLE, S.ARMING):
            assert left_idle_at is not None
            assert now - left_idle_at >= th.start_seconds
            assert util is not None and util >= th.start_util_pct
        if t.to_state is S.IDLE and t.from_state in (S.ACTIVE, S.COOLING):
            if t.from_state is S.ACTIVE:
                assert th.stop_seconds <= 0
            else:
                assert entered_cooling_at is not None
                assert now - entered_cooling_at >= th.stop_seconds
            assert util is not None and util < th.stop_util_pct
    # The machine never jumps across the cycle: idle and active are never adjacent unless a
    # duration is zero.
    for a, b in itertools.pairwise(states):
        if {a, b} == {S.IDLE, S.ACTIVE} and a is not b:
            assert th.start_seconds <= 0 if a is S.IDLE else th.stop_seconds <= 0


@settings(max_examples=200, deadline=None)
@given(th=thresholds, readings=st.lists(st.tuples(gaps, utils), min_size=1, max_size=60))
def test_unknown_reading_never_changes_telemetry_towards_its_pending_side(
    th: Thresholds, readings: list[tuple[float, float | None]]
) -> None:
    """A None reading never starts telemetry and never stops it."""
    machine = Machine(S.IDLE, 0.0)
    now = 0.0
    for gap, util in readings:
        now += gap
        before = machine.state
        machine, _ = step(machine, util, now, th)
        if util is None:
            was_on, _ = telemetry_wanted(before, Mode.AUTO, 0)
            is_on, _ = telemetry_wanted(machine.state, Mode.AUTO, 0)
            assert was_on == is_on
