"""The agent's control API: what ``status``, ``set_mode``, ``allocate``, ``release`` and ``list``
do, and the snapshots the status line and ``/metrics`` are drawn from.

The control server calls :meth:`ControlApi.handle` on its own threads with requests it already
validated; everything here reads or changes the agent's state under the agent's lock and wakes
the loop when something changed. Decisions (telemetry on or off, the child) stay with the loop.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gputel import __version__
from gputel.control.protocol import ErrorCode, RequestError
from gputel.formats import iso_utc_ms
from gputel.gpu_status import gpu_entries
from gputel.supervisor import write_failures
from gputel.supervisor.agent_metrics import AgentSnapshot
from gputel.supervisor.states import Mode

if TYPE_CHECKING:
    from gputel.supervisor.agent import Agent


class DegradedReason(enum.Enum):
    """Why the agent runs without activity decisions."""

    SOURCE_OPENING = "GPU source still opening"
    SOURCE_FAILED = "GPU source failed"
    READ_STUCK = "GPU read stuck"
    READ_FAILED = "GPU read failed"

    @property
    def is_read(self) -> bool:
        """A utilization read problem, which the next good read clears."""
        return self in (DegradedReason.READ_STUCK, DegradedReason.READ_FAILED)


@dataclass(frozen=True)
class Degraded:
    """A degraded reason with its detail (how long stuck, which error)."""

    reason: DegradedReason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value} ({self.detail})" if self.detail else self.reason.value


@dataclass
class ModeState:
    """The operator's mode and, for a timed one, when it ends (monotonic and wall clock)."""

    mode: Mode = Mode.AUTO
    until_mono: float | None = None
    until_iso: str | None = None
    set_for_s: float | None = None


def detected_allocations(heartbeat: dict[str, Any], announced: set[str]) -> list[dict[str, Any]]:
    """The jobs the recorder detected on the GPUs (``recorder.json``'s ``detected``), as status
    allocations; an id an announced allocation has is that allocation, listed once."""
    out: list[dict[str, Any]] = []
    entries = heartbeat.get("detected")
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            if entry["id"] in announced:
                continue
            out.append(
                {
                    "id": entry["id"],
                    "gpus": entry.get("gpus"),
                    "pid": None,
                    "start": entry.get("start"),
                    "detected": True,
                }
            )
    return out


class ControlApi:
    """Answers control requests from the state of ``agent``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    # ------------------------------------------------------------------ dispatch
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Control-socket requests (already validated by ``gputel.control.protocol``)."""
        op = request["op"]
        if op == "status":
            return self.status()
        if op == "set_mode":
            return self.set_mode(request["mode"], request.get("for_s"))
        agent = self.agent
        store = agent.store
        if store is None:
            raise RequestError("agent is starting; try again", ErrorCode.STARTING)
        if op == "list":
            return {"ok": True, "allocations": store.list()}
        from gputel.control.allocations import AllocationError

        try:
            if op == "allocate":
                result = store.allocate(
                    request["id"], request.get("gpus"), request.get("pid"), agent.energy_now()
                )
            elif op == "release":
                result = store.release(
                    request["id"], agent.energy_now(), xids=agent.events.take_xids
                )
            else:
                raise RequestError(f"unknown op {op!r}")
        except AllocationError as exc:
            raise RequestError(str(exc)) from None
        agent.wake()
        return {"ok": True, **result}

    def set_mode(self, mode_text: str, for_s: float | None) -> dict[str, Any]:
        agent = self.agent
        mode = Mode(mode_text)
        now = agent.clock()
        with agent.lock:
            old = agent.mode.mode
            new = ModeState(mode)
            if for_s is not None and mode is not Mode.AUTO:
                new.until_mono = now + for_s
                new.until_iso = iso_utc_ms(time.time() + for_s)
                new.set_for_s = for_s
            agent.mode = new
            if old is not mode:
                how = f" for {for_s:g}s" if new.until_mono is not None else ""
                agent.record(
                    f"mode_{old.value}",
                    f"mode_{mode.value}",
                    f"operator set mode {mode.value}{how}",
                )
        agent.wake()
        return {"ok": True, "mode": mode.value, "until": new.until_iso}

    # ------------------------------------------------------------------ views
    def status(self) -> dict[str, Any]:
        agent = self.agent
        s = agent.settings
        with agent.lock:
            child = agent.child
            child_info: dict[str, Any] | None = None
            if child is not None and child.proc is not None:
                hb = child.fresh_heartbeat() or {}
                uptime = child.uptime_s()
                child_info = {
                    "pid": child.pid,
                    "uptime_s": None if uptime is None else round(uptime, 3),
                    "restarts": child.restarts_total,
                    "restarts_by_reason": dict(child.restarts),
                    "restart_seconds": round(child.restart_seconds(), 3),
                    "stopping": not child.running,
                    "files": hb.get("files") or {},
                    "tick": hb.get("tick"),
                    "gpus_stuck": hb.get("gpus_stuck") or [],
                }
            allocations = [
                {**{k: a.get(k) for k in ("id", "gpus", "pid", "start")}, "detected": False}
                for a in (agent.store.list() if agent.store is not None else [])
            ]
            hb = (child.fresh_heartbeat() if child is not None else None) or {}
            allocations += detected_allocations(hb, {str(a["id"]) for a in allocations})
            processes = hb.get("processes")
            gpus = gpu_entries(
                agent.devices,
                agent.utilization,
                agent.activity,
                agent.light,
                None if agent.light_at is None else iso_utc_ms(agent.light_at),
                hb,
                stuck=set(agent.stuck) | set(child_info["gpus_stuck"] if child_info else ()),
            )
            return {
                "ok": True,
                "agent": "running",
                "pid": os.getpid(),
                "version": __version__,
                "state": agent.machine.state.value,
                "mode": agent.mode.mode.value,
                "mode_until": agent.mode.until_iso,
                "telemetry_active": agent.wanted,
                "telemetry_reason": agent.wanted_reason,
                "utilization_pct": agent.util_max,
                "activity": s.activity,
                "allocations": allocations,
                "gpus": gpus,
                "processes": processes if isinstance(processes, list) else [],
                "processes_notice": hb.get("processes_notice"),
                "child": child_info,
                "transitions": [r.as_dict() for r in agent.recent],
                "events": agent.events.recent.as_status(),
                "degraded": None if agent.degraded is None else str(agent.degraded),
                "backend": agent.backend,
                "notice": self.notice(),
                "log_dir": str(s.log_dir),
                "run_dir": str(s.run_dir),
                "exporter": agent.exporter,
                "exporter_error": agent.exporter_error,
                "interval_s": s.interval_s,
                "settings": s.to_env(),
                "write_failures": write_failures.entries(agent.write_counters(), "agent")
                + write_failures.from_heartbeat(hb),
            }

    def notice(self) -> str | None:
        """The source's notice, the event listener's and the kernel log reader's, in one line
        (None: nothing to say)."""
        agent = self.agent
        listener, kmsg = agent.listener, agent.kmsg
        parts = [
            agent.notice,
            None if listener is None else listener.notice,
            None if kmsg is None else kmsg.notice,
        ]
        return "; ".join(p for p in parts if p) or None

    def status_line(self) -> str:
        """One line for sd_notify STATUS and ``/healthz``."""
        agent = self.agent
        with agent.lock:
            child = agent.child
            pid = child.pid if child is not None and child.running else None
            n = agent.open_allocations()
            parts = [
                f"state {agent.machine.state.value}",
                f"mode {agent.mode.mode.value}",
                f"{n} allocation{'s' if n != 1 else ''}",
                f"telemetry on (pid {pid})"
                if pid
                else ("telemetry starting" if agent.wanted else "telemetry off"),
            ]
            if agent.degraded is not None:
                parts.append(f"degraded: {agent.degraded}")
            if agent.exporter_error is not None:
                parts.append(agent.exporter_error)
        return ", ".join(parts)

    def snapshot(self) -> AgentSnapshot:
        """The agent's own series for ``/metrics``."""
        agent = self.agent
        with agent.lock:
            child = agent.child
            return AgentSnapshot(
                version=__version__,
                backend=agent.backend,
                start_time_s=agent.start_wall,
                state=agent.machine.state.value,
                mode=agent.mode.mode.value,
                telemetry_active=agent.wanted,
                child_up=child is not None and child.running,
                allocations_open=agent.open_allocations(),
                gpu_read_degraded=agent.degraded is not None,
                gpus_stuck=[(str(d.index), d.uuid, d.index in agent.stuck) for d in agent.devices],
                poll_duration_s=agent.poll_duration_s,
                transitions=dict(agent.transition_counts),
                restarts=dict(child.restarts) if child is not None else {},
                restart_seconds=child.restart_seconds() if child is not None else 0.0,
                events=agent.events.counters.families(),
                files=[(f, c.rows_failed, c.failing) for f, c in agent.write_counters()],
            )
