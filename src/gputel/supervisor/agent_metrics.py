"""The agent's own Prometheus series, and how they are joined with the recorder's.

The agent's families are declared here and written by ``telemetry/promtext.py`` (the one text
writer) from an in-memory snapshot at scrape time: nothing here touches a GPU, and the agent does
not load ``prometheus_client`` at all (it cost the idle agent about 2 MiB of a 40 MiB budget that
the CLI layer already uses most of). ``promtool check metrics`` verifies the output in the tests.

The recorder's exposition is appended only while that recorder is alive and its ``metrics.prom``
is fresh, so a scrape never shows GPU numbers from a child that has died or hung. The agent owns
``gputel_telemetry_active`` and the ``gputel_agent_*`` families, which the recorder never
renders, so the join is a plain concatenation: no parsing, and no family is ever repeated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gputel import runtime
from gputel.supervisor.events import EVENTS, XID_ERRORS
from gputel.supervisor.events import Sample as EventSample
from gputel.supervisor.states import ActivityState, Mode
from gputel.supervisor.write_failures import FAILING as FILE_WRITE_FAILING
from gputel.supervisor.write_failures import ROWS_FAILED as FILE_ROWS_FAILED
from gputel.telemetry import promtext
from gputel.telemetry.promtext import Family

RESTART_REASONS = ("crash", "hung")
#: Every ``to_state`` the agent may record, so each counter series exists from the first scrape.
TRANSITION_TARGETS = (
    *(s.value for s in ActivityState),
    "telemetry_on",
    "telemetry_off",
    *(f"mode_{m.value}" for m in Mode),
)


@dataclass
class AgentSnapshot:
    """What the exposition shows; the agent builds one under its lock at scrape time."""

    version: str
    backend: str
    start_time_s: float
    state: str = ActivityState.IDLE.value
    mode: str = Mode.AUTO.value
    telemetry_active: bool = False
    child_up: bool = False
    allocations_open: int = 0
    gpu_read_degraded: bool = False
    gpus_stuck: list[tuple[str, str, bool]] = field(default_factory=list)
    """(gpu index, uuid, whether the agent's read of it is stuck) per GPU."""
    poll_duration_s: float | None = None
    transitions: Mapping[str, int] = field(default_factory=dict)
    restarts: Mapping[str, int] = field(default_factory=dict)
    restart_seconds: float = 0.0
    events: list[tuple[Family, list[EventSample]]] = field(default_factory=list)
    """The GPU event counters (``EventCounters.families()``): served whether telemetry is on or
    off, because the agent, not the recorder, receives the events."""
    files: list[tuple[str, int, bool]] = field(default_factory=list)
    """Per appended file of the agent: (name, rows failed, failing now)."""


TELEMETRY_ACTIVE = promtext.TELEMETRY_ACTIVE
STATE = Family("gputel_agent_state", "gauge", "Activity state of the supervisor (1 = current).")
MODE = Family("gputel_agent_mode", "gauge", "Operator mode of the supervisor (1 = current).")
TRANSITIONS = Family(
    "gputel_agent_transitions_total",
    "counter",
    "Supervisor transitions since the agent started, by the state entered.",
)
RESTARTS = Family(
    "gputel_agent_child_restarts_total",
    "counter",
    "Telemetry recorder restarts after it crashed or hung.",
)
RESTART_SECONDS = Family(
    "gputel_agent_child_restart_seconds_total",
    "counter",
    "Seconds telemetry was wanted but no recorder ran because one crashed or hung and was "
    "waiting to be restarted.",
)
CHILD_UP = Family(
    "gputel_agent_child_up", "gauge", "1 while a telemetry recorder process is running."
)
ALLOCATIONS_OPEN = Family(
    "gputel_agent_allocations_open", "gauge", "Open orchestrator allocations."
)
GPU_READ_DEGRADED = Family(
    "gputel_agent_gpu_read_degraded",
    "gauge",
    "1 while the agent's GPU utilization read is stuck or failing.",
)
GPU_READ_STUCK = Family(
    "gputel_agent_gpu_read_stuck",
    "gauge",
    "1 while the agent's read of this GPU has not returned within its deadline (a hung driver "
    "call); the agent decides from the other GPUs.",
)
POLL_DURATION = Family(
    "gputel_agent_poll_duration_seconds",
    "gauge",
    "Duration of the agent's last GPU utilization read.",
)
INFO = Family("gputel_agent_info", "gauge", "gputel agent version and GPU backend.")
START_TIME = Family(
    "gputel_agent_start_time_seconds", "gauge", "Start time of the agent since the Unix epoch."
)

AGENT_FAMILIES: tuple[Family, ...] = (
    TELEMETRY_ACTIVE,
    STATE,
    MODE,
    TRANSITIONS,
    RESTARTS,
    RESTART_SECONDS,
    CHILD_UP,
    ALLOCATIONS_OPEN,
    GPU_READ_DEGRADED,
    GPU_READ_STUCK,
    POLL_DURATION,
    INFO,
    START_TIME,
    XID_ERRORS,
    EVENTS,
    FILE_ROWS_FAILED,
    FILE_WRITE_FAILING,
)
"""Every family the agent renders; none of them is ever in the recorder's exposition."""

_NO_LABELS: Mapping[str, str] = {}


def _flag(on: bool) -> list[tuple[Mapping[str, str], float]]:
    return [(_NO_LABELS, 1.0 if on else 0.0)]


def render_agent(s: AgentSnapshot) -> bytes:
    """The agent's families as exposition text."""
    targets = sorted(set(TRANSITION_TARGETS) | set(s.transitions))
    parts = [
        TELEMETRY_ACTIVE.render(_flag(s.telemetry_active)),
        STATE.render(
            [({"state": st.value}, 1.0 if st.value == s.state else 0.0) for st in ActivityState]
        ),
        MODE.render([({"mode": m.value}, 1.0 if m.value == s.mode else 0.0) for m in Mode]),
        TRANSITIONS.render([({"to_state": t}, float(s.transitions.get(t, 0))) for t in targets]),
        RESTARTS.render([({"reason": r}, float(s.restarts.get(r, 0))) for r in RESTART_REASONS]),
        RESTART_SECONDS.render([(_NO_LABELS, s.restart_seconds)]),
        CHILD_UP.render(_flag(s.child_up)),
        ALLOCATIONS_OPEN.render([(_NO_LABELS, float(s.allocations_open))]),
        GPU_READ_DEGRADED.render(_flag(s.gpu_read_degraded)),
    ]
    if s.gpus_stuck:
        parts.append(
            GPU_READ_STUCK.render(
                [({"gpu": i, "uuid": u}, 1.0 if on else 0.0) for i, u, on in s.gpus_stuck]
            )
        )
    if s.poll_duration_s is not None:
        parts.append(POLL_DURATION.render([(_NO_LABELS, s.poll_duration_s)]))
    parts.append(INFO.render([({"version": s.version, "backend": s.backend}, 1.0)]))
    parts.append(START_TIME.render([(_NO_LABELS, s.start_time_s)]))
    parts.extend(family.render(samples) for family, samples in s.events)
    if s.files:
        parts.append(FILE_ROWS_FAILED.render([({"file": f}, float(n)) for f, n, _ in s.files]))
        parts.append(
            FILE_WRITE_FAILING.render([({"file": f}, 1.0 if on else 0.0) for f, _, on in s.files])
        )
    return "".join(parts).encode()


def join_exposition(agent_bytes: bytes, child_bytes: bytes | None) -> bytes:
    """Agent text plus the recorder's: the two never share a family (``promtext``)."""
    return promtext.join(agent_bytes, child_bytes)


def read_fresh_metrics(path: Path, max_age_s: float, now: float | None = None) -> bytes | None:
    """The file's bytes if it was written within ``max_age_s`` (wall clock mtime), else None."""
    try:
        with open(runtime.open_file(path, os.O_RDONLY), "rb") as fh:
            st = os.fstat(fh.fileno())
            if (time.time() if now is None else now) - st.st_mtime > max_age_s:
                return None
            return fh.read()
    except OSError:
        return None
