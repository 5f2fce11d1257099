"""The agent's own Prometheus series, and how they are joined with the recorder's.

The agent's series are rendered by hand in the text exposition format (0.0.4) from an in-memory
snapshot at scrape time: nothing here touches a GPU, and the agent does not load
``prometheus_client`` at all (it cost the idle agent about 2 MiB of a 40 MiB budget that the
CLI layer already uses most of). The families are fixed and few, and ``promtool check metrics``
verifies the output in the tests.

The recorder's exposition is appended only while that recorder is alive and its ``metrics.prom``
is fresh, so a scrape never shows GPU numbers from a child that has died or hung. A family the
agent already serves is dropped from the recorder's bytes, so the joined text never repeats one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gputel.supervisor.states import ActivityState, Mode

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
    poll_duration_s: float | None = None
    transitions: Mapping[str, int] = field(default_factory=dict)
    restarts: Mapping[str, int] = field(default_factory=dict)


def _value(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def _label(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n")


Sample = tuple[Mapping[str, str], float]


def _family(name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> Iterator[str]:
    yield f"# HELP {name} {_help(help_text)}\n"
    yield f"# TYPE {name} {kind}\n"
    for labels, value in samples:
        if labels:
            inner = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            yield f"{name}{{{inner}}} {_value(value)}\n"
        else:
            yield f"{name} {_value(value)}\n"


def _one(value: float) -> list[Sample]:
    return [({}, value)]


def render_agent(s: AgentSnapshot) -> bytes:
    """The agent's families as exposition text."""
    parts: list[str] = []
    add = parts.extend
    add(
        _family(
            "gputel_telemetry_active",
            "gauge",
            "1 while telemetry is on (the recorder should run), 0 while it is intentionally off.",
            _one(1.0 if s.telemetry_active else 0.0),
        )
    )
    add(
        _family(
            "gputel_agent_state",
            "gauge",
            "Activity state of the supervisor (1 = current).",
            [({"state": st.value}, 1.0 if st.value == s.state else 0.0) for st in ActivityState],
        )
    )
    add(
        _family(
            "gputel_agent_mode",
            "gauge",
            "Operator mode of the supervisor (1 = current).",
            [({"mode": m.value}, 1.0 if m.value == s.mode else 0.0) for m in Mode],
        )
    )
    targets = sorted(set(TRANSITION_TARGETS) | set(s.transitions))
    add(
        _family(
            "gputel_agent_transitions_total",
            "counter",
            "Supervisor transitions since the agent started, by the state entered.",
            [({"to_state": t}, float(s.transitions.get(t, 0))) for t in targets],
        )
    )
    add(
        _family(
            "gputel_agent_child_restarts_total",
            "counter",
            "Telemetry recorder restarts after it crashed or hung.",
            [({"reason": r}, float(s.restarts.get(r, 0))) for r in RESTART_REASONS],
        )
    )
    add(
        _family(
            "gputel_agent_child_up",
            "gauge",
            "1 while a telemetry recorder process is running.",
            _one(1.0 if s.child_up else 0.0),
        )
    )
    add(
        _family(
            "gputel_agent_allocations_open",
            "gauge",
            "Open orchestrator allocations.",
            _one(float(s.allocations_open)),
        )
    )
    add(
        _family(
            "gputel_agent_gpu_read_degraded",
            "gauge",
            "1 while the agent's GPU utilization read is stuck or failing.",
            _one(1.0 if s.gpu_read_degraded else 0.0),
        )
    )
    if s.poll_duration_s is not None:
        add(
            _family(
                "gputel_agent_poll_duration_seconds",
                "gauge",
                "Duration of the agent's last GPU utilization read.",
                _one(s.poll_duration_s),
            )
        )
    add(
        _family(
            "gputel_agent_info",
            "gauge",
            "gputel agent version and GPU backend.",
            [({"version": s.version, "backend": s.backend}, 1.0)],
        )
    )
    add(
        _family(
            "gputel_agent_start_time_seconds",
            "gauge",
            "Start time of the agent since the Unix epoch.",
            _one(s.start_time_s),
        )
    )
    return "".join(parts).encode()


#: Families this module renders (sample names of counters carry ``_total``).
AGENT_FAMILIES = frozenset(
    {
        b"gputel_telemetry_active",
        b"gputel_agent_state",
        b"gputel_agent_mode",
        b"gputel_agent_transitions_total",
        b"gputel_agent_transitions",
        b"gputel_agent_child_restarts_total",
        b"gputel_agent_child_restarts",
        b"gputel_agent_child_up",
        b"gputel_agent_allocations_open",
        b"gputel_agent_gpu_read_degraded",
        b"gputel_agent_poll_duration_seconds",
        b"gputel_agent_info",
        b"gputel_agent_start_time_seconds",
    }
)


def join_exposition(agent_bytes: bytes, child_bytes: bytes | None) -> bytes:
    """Agent text plus the recorder's, minus any family the agent already has."""
    if not child_bytes:
        return agent_bytes
    extra = drop_families(child_bytes, AGENT_FAMILIES)
    if extra and not extra.endswith(b"\n"):
        extra += b"\n"
    return agent_bytes + extra


def drop_families(data: bytes, names: frozenset[bytes]) -> bytes:
    """``data`` without the families (HELP, TYPE and samples) whose names are in ``names``."""
    if not names or not any(n in data for n in names):
        return data
    out: list[bytes] = []
    skipping = False
    for line in data.splitlines(keepends=True):
        if line.startswith((b"# HELP ", b"# TYPE ")):
            parts = line.split(b" ", 3)
            skipping = len(parts) >= 3 and parts[2] in names
        elif not line.startswith(b"#"):
            name = line.split(b"{", 1)[0].split(b" ", 1)[0]
            base = name
            for suffix in (b"_total", b"_created", b"_bucket", b"_sum", b"_count"):
                if name.endswith(suffix):
                    base = name[: -len(suffix)]
                    break
            skipping = name in names or base in names
        if not skipping:
            out.append(line)
    return b"".join(out)


def read_fresh_metrics(path: Path, max_age_s: float, now: float | None = None) -> bytes | None:
    """The file's bytes if it was written within ``max_age_s`` (wall clock mtime), else None."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (time.time() if now is None else now) - st.st_mtime > max_age_s:
                return None
            return fh.read()
    except OSError:
        return None
