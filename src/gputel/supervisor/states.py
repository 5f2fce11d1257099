"""The activity state machine: pure, with time passed in, so it is tested by tables and replayed.

``idle → arming → active → cooling → idle``. Telemetry starts when utilization (the maximum over
the selected GPUs) is at or above ``start_util`` continuously for ``start_seconds``, and stops when
it is below ``stop_util`` continuously for ``stop_seconds``. A missing reading (no GPU answered,
or the read hit its deadline) proves nothing either way, so it breaks whichever continuous
condition was pending: arming falls back to idle (never start on an unknown), cooling goes back to
active (never stop on an unknown). The agent and ``gputel replay`` both run exactly this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from gputel.settings import DEFAULTS, Settings, threshold_problem


class ActivityState(str, Enum):
    IDLE = "idle"
    ARMING = "arming"
    ACTIVE = "active"
    COOLING = "cooling"


class Mode(str, Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class Thresholds:
    start_util_pct: float = DEFAULTS["start_util_pct"]
    start_seconds: float = DEFAULTS["start_seconds"]
    stop_util_pct: float = DEFAULTS["stop_util_pct"]
    stop_seconds: float = DEFAULTS["stop_seconds"]

    def __post_init__(self) -> None:
        problem = threshold_problem(
            self.start_util_pct, self.start_seconds, self.stop_util_pct, self.stop_seconds
        )
        if problem is not None:
            raise ValueError(f"{problem[0]} {problem[1]}")

    @classmethod
    def of(cls, settings: Settings) -> Thresholds:
        return cls(
            settings.start_util_pct,
            settings.start_seconds,
            settings.stop_util_pct,
            settings.stop_seconds,
        )


@dataclass(frozen=True, slots=True)
class Machine:
    state: ActivityState = ActivityState.IDLE
    since: float = 0.0
    """Monotonic time the current state was entered (arming/cooling: when the condition began)."""


@dataclass(frozen=True, slots=True)
class Transition:
    from_state: ActivityState
    to_state: ActivityState
    reason: str
    at: float


def _pct(value: float) -> str:
    return f"{value:g}%"


def step(
    machine: Machine, util_pct: float | None, now: float, th: Thresholds
) -> tuple[Machine, Transition | None]:
    """Advance by one reading taken at ``now``; return the new machine and its transition."""
    state = machine.state
    S = ActivityState

    def go(to: ActivityState, reason: str) -> tuple[Machine, Transition]:
        return Machine(to, now), Transition(state, to, reason, now)

    if state is S.IDLE:
        if util_pct is not None and util_pct >= th.start_util_pct:
            if th.start_seconds <= 0:
                return go(S.ACTIVE, f"utilization {_pct(util_pct)} >= {_pct(th.start_util_pct)}")
            return go(S.ARMING, f"utilization {_pct(util_pct)} >= {_pct(th.start_util_pct)}")
        return machine, None

    if state is S.ARMING:
        if util_pct is None:
            return go(S.IDLE, "utilization unknown while arming")
        if util_pct < th.start_util_pct:
            return go(
                S.IDLE,
                f"utilization {_pct(util_pct)} fell below {_pct(th.start_util_pct)} while arming",
            )
        if now - machine.since >= th.start_seconds:
            return go(
                S.ACTIVE, f"utilization >= {_pct(th.start_util_pct)} for {th.start_seconds:g}s"
            )
        return machine, None

    if state is S.ACTIVE:
        if util_pct is not None and util_pct < th.stop_util_pct:
            if th.stop_seconds <= 0:
                return go(S.IDLE, f"utilization {_pct(util_pct)} < {_pct(th.stop_util_pct)}")
            return go(S.COOLING, f"utilization {_pct(util_pct)} < {_pct(th.stop_util_pct)}")
        return machine, None

    # COOLING
    if util_pct is None:
        return go(S.ACTIVE, "utilization unknown while cooling")
    if util_pct >= th.stop_util_pct:
        return go(
            S.ACTIVE,
            f"utilization {_pct(util_pct)} back at or above {_pct(th.stop_util_pct)} while cooling",
        )
    if now - machine.since >= th.stop_seconds:
        return go(S.IDLE, f"utilization < {_pct(th.stop_util_pct)} for {th.stop_seconds:g}s")
    return machine, None


def telemetry_wanted(
    state: ActivityState, mode: Mode, allocations_open: int, capture: str | None = None
) -> tuple[bool, str]:
    """Whether the recorder should run, and the reason in words (for logs and transitions).

    ``capture`` is the reason of an open event capture window (``capture after Xid 79 on
    GPU 0``), None when none is open: it forces telemetry on and names itself as the reason,
    before allocations and activity, so status says why the node records; the operator's mode
    still wins.
    """
    if mode is Mode.OFF:
        return False, "operator mode off"
    if mode is Mode.ON:
        return True, "operator mode on"
    if capture is not None:
        return True, capture
    if allocations_open > 0:
        return True, f"{allocations_open} allocation(s) open"
    if state in (ActivityState.ACTIVE, ActivityState.COOLING):
        return True, f"GPUs {state.value}"
    return False, f"GPUs {state.value}"
