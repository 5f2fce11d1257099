"""The agent's decisions, tick by tick, on an injected clock with a fake GPU source and child.

Mode × activity × allocations × child state × degraded: each test builds a real ``Agent`` (real
state machine, control API, allocation store and control socket), replaces only the GPU source,
the child process and the clock, and calls ``tick`` itself, so nothing here waits on real time.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_doubles import FakeClock, FakeProc, FakeSource
from gputel import runtime
from gputel.control.client import request
from gputel.control.protocol import ErrorCode, RequestError
from gputel.schema import GpuReading
from gputel.settings import Settings, load_settings
from gputel.supervisor.agent import Agent
from gputel.supervisor.control_api import DegradedReason
from gputel.supervisor.states import ActivityState
from gputel.telemetry.head import decode_head, take_head
from test_agent_e2e import wait_for


class Node:
    """One agent with its fakes; ``tick(seconds)`` advances the clock and runs one poll."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.clock = FakeClock()
        self.source = FakeSource()
        self.procs: list[FakeProc] = []
        self.settings: Settings = load_settings(
            {
                "GPUTEL_RUN_DIR": str(tmp / "run"),
                "GPUTEL_LOG_DIR": str(tmp / "log"),
                "GPUTEL_EXPORTER_PORT": "0",
                "GPUTEL_INTERVAL": "1",
                "GPUTEL_START_UTIL": "20",
                "GPUTEL_START_SECONDS": "3",
                "GPUTEL_STOP_UTIL": "10",
                "GPUTEL_STOP_SECONDS": "5",
                **(env or {}),
            }
        )
        self.agent = Agent(
            self.settings,
            self.clock,
            env={},
            spawn=self._spawn,
            install_signals=False,
            source=self.source,
        )

    def _spawn(self, argv: list[str], env: dict[str, str]) -> FakeProc:
        proc = FakeProc()
        self.procs.append(proc)
        return proc

    def beat(self) -> None:
        """The running child's heartbeat, as the recorder writes it, at the fake time."""
        pid = self.agent.child.pid if self.agent.child is not None else None
        runtime.atomic_write_json(
            self.settings.run_dir / runtime.RECORDER_STATE_FILE,
            {"pid": pid, "monotonic": self.clock(), "tick": 1, "files": {}},
        )

    def tick(self, seconds: float = 1.0, util: float | None = None) -> dict[str, Any]:
        if util is not None:
            self.source.util = util
        self.clock.advance(seconds)
        self.agent.tick(self.clock())
        return self.agent.api.status()

    def ask(self, **message: Any) -> dict[str, Any]:
        return self.agent.api.handle(message)

    @property
    def running(self) -> list[FakeProc]:
        return [p for p in self.procs if p.code is None]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(env: dict[str, str] | None = None) -> Node:
        n = Node(tmp_path / f"n{len(made)}", env)
        made.append(n)
        n.agent._setup()
        return n

    yield make
    for n in made:
        n.source.block.set()
        n.agent._teardown()


# ------------------------------------------------------------------------------ the decision table
@pytest.mark.parametrize("mode", ["auto", "on", "off"])
@pytest.mark.parametrize("busy", [False, True])
@pytest.mark.parametrize("allocated", [False, True])
def test_telemetry_follows_mode_activity_and_allocations(
    node: Callable[..., Node], mode: str, busy: bool, allocated: bool
) -> None:
    n = node()
    n.ask(op="set_mode", mode=mode, for_s=None)
    if allocated:
        assert n.ask(op="allocate", id="job-1", gpus=None, pid=None)["created"] is True
    for _ in range(5):  # > START_SECONDS of readings
        st = n.tick(util=90.0 if busy else 0.0)
    expected = mode == "on" or (mode == "auto" and (busy or allocated))
    assert st["state"] == ("active" if busy else "idle")
    assert st["telemetry_active"] is expected
    assert len(n.running) == (1 if expected else 0)
    assert (st["child"] is not None) is expected
    reasons = {
        "on": "operator mode on",
        "off": "operator mode off",
    }
    if mode in reasons:
        assert st["telemetry_reason"] == reasons[mode]
    elif allocated:
        assert st["telemetry_reason"] == "1 allocation(s) open"
    else:
        assert st["telemetry_reason"] == f"GPUs {st['state']}"


def test_a_gpu_event_captures_for_its_window_on_the_injected_clock(
    node: Callable[..., Node],
) -> None:
    n = node({"GPUTEL_EVENT_CAPTURE_SECONDS": "10"})
    assert n.ask(op="allocate", id="job-3", gpus=[1], pid=None)["created"] is True
    assert n.ask(op="release", id="job-3")["released"] is True
    assert n.ask(op="allocate", id="job-4", gpus=[0], pid=None)["created"] is True
    n.agent._gpu_event(1, "xid", 79)  # what the listener's thread calls
    (row,) = n.agent.events.recent.events()
    assert (row.gpu, row.uuid, row.xid, row.allocations) == (1, "GPU-1", 79, ())
    assert n.ask(op="release", id="job-4")["released"] is True
    st = n.tick(util=0.0)
    assert st["telemetry_active"] and st["telemetry_reason"] == "capture after Xid 79 on GPU 1"
    assert st["events"][0]["action"] == "drain"
    last = n.agent.recent[-1]
    assert (last.to_state, last.reason) == ("telemetry_on", "capture after Xid 79 on GPU 1")
    for _ in range(8):
        assert n.tick()["telemetry_active"]
    # A second event 9 s in opens a new window from now.
    n.agent._gpu_event(0, "ecc_dbe", None)
    for _ in range(9):
        st = n.tick()
        assert st["telemetry_active"] and st["telemetry_reason"] == "capture after ecc_dbe on GPU 0"
    st = n.tick(2.0)
    assert not st["telemetry_active"] and st["telemetry_reason"] == "GPUs idle"
    assert n.agent.recent[-1].to_state == "telemetry_off"
    counts = n.agent.events.counters.event_counts()
    assert counts == {(1, "GPU-1", "xid"): 1, (0, "GPU-0", "ecc_dbe"): 1}


def test_capture_zero_records_the_event_without_telemetry(node: Callable[..., Node]) -> None:
    n = node({"GPUTEL_EVENT_CAPTURE_SECONDS": "0"})
    n.agent._gpu_event(0, "xid", 13)
    st = n.tick(util=0.0)
    assert not st["telemetry_active"] and [e["xid"] for e in st["events"]] == [13]


def test_hysteresis_on_the_injected_clock(node: Callable[..., Node]) -> None:
    n = node()
    assert n.tick(util=90.0)["state"] == "arming"
    assert n.tick(util=5.0)["state"] == "idle"  # a blip shorter than START_SECONDS
    n.tick(util=90.0)
    n.tick()
    n.tick()
    st = n.tick()
    assert st["state"] == "active" and st["telemetry_active"] and len(n.running) == 1
    n.beat()
    for _ in range(4):  # a quiet spell shorter than STOP_SECONDS keeps the same child
        st = n.tick(util=0.0)
    assert st["state"] == "cooling" and st["telemetry_active"]
    n.beat()
    st = n.tick(util=90.0)
    assert st["state"] == "active" and len(n.procs) == 1
    for _ in range(7):
        st = n.tick(util=0.0)
    assert st["state"] == "idle" and not st["telemetry_active"]
    assert n.procs[0].signals == [signal.SIGTERM] and n.running == []
    pairs = [(t["from_state"], t["to_state"]) for t in st["transitions"]]
    assert pairs == [
        ("idle", "arming"),
        ("arming", "idle"),
        ("idle", "arming"),
        ("arming", "active"),
        ("telemetry_off", "telemetry_on"),
        ("active", "cooling"),
        ("cooling", "active"),
        ("active", "cooling"),
        ("cooling", "idle"),
        ("telemetry_on", "telemetry_off"),
    ]


def test_timed_mode_expires_on_the_clock(node: Callable[..., Node]) -> None:
    n = node()
    reply = n.ask(op="set_mode", mode="on", for_s=30.0)
    assert reply["mode"] == "on" and reply["until"] is not None
    assert n.tick(29.0)["telemetry_active"] is True
    n.beat()
    st = n.tick(1.0)
    assert st["mode"] == "auto" and st["mode_until"] is None
    assert st["telemetry_active"] is False and n.running == []
    assert st["transitions"][-2]["reason"] == "mode on for 30s ended"


def test_mode_off_wins_over_allocations_until_auto(node: Callable[..., Node]) -> None:
    n = node()
    n.ask(op="allocate", id="job-1", gpus=[1], pid=None)
    assert n.tick()["telemetry_active"] is True
    n.ask(op="set_mode", mode="off", for_s=None)
    assert n.tick()["telemetry_active"] is False
    n.ask(op="set_mode", mode="auto", for_s=None)
    assert n.tick()["telemetry_active"] is True
    reply = n.ask(op="release", id="job-1")
    assert reply["released"] is True and reply["summary"]["id"] == "job-1"
    st = n.tick()
    assert st["telemetry_active"] is False and st["allocations"] == []
    assert len(n.procs) == 2  # one child per stretch of wanted telemetry


# ------------------------------------------------------------------------------ the child
def test_a_crashed_child_restarts_after_its_backoff(node: Callable[..., Node]) -> None:
    n = node()
    n.ask(op="set_mode", mode="on", for_s=None)
    n.tick()
    first = n.procs[0]
    first.code = 1  # crashes
    st = n.tick(0.5)
    assert st["child"] is None and n.running == []
    assert n.agent.child is not None and n.agent.child.restarts["crash"] == 1
    st = n.tick(1.0)  # the first backoff is 1 s
    assert len(n.procs) == 2 and st["child"]["pid"] == n.procs[1].pid
    assert st["child"]["restarts_by_reason"] == {"crash": 1, "hung": 0}


def test_a_child_without_heartbeat_is_killed_as_hung(node: Callable[..., Node]) -> None:
    n = node()
    n.ask(op="set_mode", mode="on", for_s=None)
    n.tick()
    grace = n.agent.child.start_grace_s if n.agent.child is not None else 0.0
    n.tick(grace - 1)
    assert n.procs[0].signals == []
    n.tick(2.0)
    assert signal.SIGKILL in n.procs[0].signals
    snapshot = n.agent.api.snapshot()
    assert snapshot.restarts["hung"] == 1 and not snapshot.child_up


# ------------------------------------------------------------------------------ degraded
def test_a_failing_read_degrades_and_recovers(node: Callable[..., Node]) -> None:
    n = node()
    n.tick(util=90.0)
    n.source.fail = RuntimeError("NVML_ERROR_GPU_IS_LOST")
    st = n.tick()
    assert st["degraded"] == "GPU read failed (RuntimeError)"
    assert n.agent.degraded is not None
    assert n.agent.degraded.reason is DegradedReason.READ_FAILED
    assert st["utilization_pct"] is None
    assert st["state"] == "idle"  # an unknown reading never arms
    assert [g["utilization_gpu_pct"] for g in st["gpus"]] == [None, None]
    assert n.agent.api.snapshot().gpu_read_degraded is True
    assert "degraded: GPU read failed" in n.agent.api.status_line()
    n.source.fail = None
    st = n.tick()
    assert st["degraded"] is None and st["utilization_pct"] == 90.0


def test_a_stuck_read_is_not_queued_behind(node: Callable[..., Node]) -> None:
    n = node()
    n.agent.read_deadline_s = 0.05
    n.source.block.clear()
    st = n.tick()
    assert n.agent.degraded is not None
    assert n.agent.degraded.reason is DegradedReason.READ_STUCK
    reads = n.source.reads
    st = n.tick(7.0)
    assert st["degraded"] == "GPU read stuck (for 7s)"  # measured on the injected clock
    assert n.source.reads == reads  # no second read behind the stuck one
    n.ask(op="set_mode", mode="on", for_s=None)  # decisions that need no reading still apply
    assert n.tick()["telemetry_active"] is True
    n.source.block.set()
    wait_for(lambda: n.agent.readers.stuck == [], 5, "the stuck read to return")
    st = n.tick(util=50.0)
    assert st["degraded"] is None and st["utilization_pct"] == 50.0


# ------------------------------------------------------------------------------ control API
def test_allocations_before_the_store_is_open_answer_starting(tmp_path: Path) -> None:
    n = Node(tmp_path)  # not set up: no allocation store yet
    with pytest.raises(RequestError) as info:
        n.ask(op="allocate", id="job-1", gpus=None, pid=None)
    assert info.value.code is ErrorCode.STARTING
    assert n.ask(op="status")["state"] == "idle"


def test_the_socket_serves_the_same_dispatcher(node: Callable[..., Node]) -> None:
    n = node()
    run_dir = n.settings.run_dir
    reply = request(run_dir, {"op": "allocate", "id": "bad id!", "gpus": None, "pid": None})
    assert reply["ok"] is False and reply["code"] == "invalid"
    reply = request(run_dir, {"op": "allocate", "id": "job-9", "gpus": [5], "pid": None})
    assert reply["ok"] is False and reply["code"] == "invalid" and "5" in reply["error"]
    reply = request(run_dir, {"op": "allocate", "id": "job-9", "gpus": [0], "pid": None})
    assert reply["ok"] is True and reply["allocation"]["start_energy_j"] == {"0": 100.0}
    assert n.tick()["telemetry_active"] is True
    assert request(run_dir, {"op": "status"})["allocations"][0]["id"] == "job-9"
    assert n.agent.api.snapshot().allocations_open == 1
    assert n.agent.api.snapshot().state == ActivityState.IDLE.value


# ------------------------------------------------------------------------------ the pre-trigger
def head_file(n: Node) -> Path:
    return n.settings.run_dir / runtime.PRETRIGGER_FILE


def test_a_session_started_by_activity_gets_the_head(node: Callable[..., Node]) -> None:
    n = node({"GPUTEL_PRETRIGGER_SECONDS": "4"})
    for _ in range(10):
        n.tick(util=0.0)
    assert not head_file(n).exists()
    spawned_with: list[list[float]] = []
    real_spawn = n._spawn

    def spawn(argv: list[str], env: dict[str, str]) -> FakeProc:
        # The head is in place before the child exists.
        spawned_with.append([t.monotonic for t in take_head(head_file(n))])
        head_file(n).write_bytes(b"")  # as if the child had not taken it yet
        return real_spawn(argv, env)

    n.agent._spawn = spawn
    for _ in range(4):
        n.tick(util=90.0)  # the 4th reading completes START_SECONDS=3: telemetry on
    assert len(n.running) == 1
    # The last 4 s of readings, ending with the tick that started the session.
    now = n.clock()
    assert spawned_with == [[now - 4, now - 3, now - 2, now - 1, now]]
    # While the child starts, each tick adds its reading after the whole window.
    n.tick()
    n.tick()
    head = [t.monotonic for t in decode_head(head_file(n).read_bytes())]
    assert head == [now - 4, now - 3, now - 2, now - 1, now, now + 1, now + 2]
    # The child ticks: what is left is removed, and the ring starts over.
    n.beat()
    n.tick()
    assert not head_file(n).exists()
    assert n.agent.handoff is not None and len(n.agent.handoff.ring) == 0
    st = n.tick()
    assert len(n.agent.handoff.ring) == 0  # no readings kept while the child records
    # The light read goes on: status shows each GPU's power.
    assert [g["power_w"] for g in st["gpus"]] == [190.0, 100.0]


def test_a_restarted_child_gets_no_head_but_the_next_session_does(
    node: Callable[..., Node],
) -> None:
    n = node({"GPUTEL_PRETRIGGER_SECONDS": "3"})
    for _ in range(4):
        n.tick(util=90.0)
    assert head_file(n).exists() and len(n.running) == 1
    n.beat()
    n.tick()
    assert not head_file(n).exists()
    n.running[0].code = 1  # crash
    for _ in range(3):
        n.tick()
    assert len(n.running) == 1 and not head_file(n).exists()
    n.beat()
    for _ in range(8):
        n.tick(util=0.0)  # > STOP_SECONDS: the session ends
    assert not n.running
    for _ in range(4):
        n.tick(util=0.0)
    n.ask(op="set_mode", mode="on", for_s=None)  # the operator starts the next session
    n.tick()
    assert len(n.running) == 1
    ticks = decode_head(head_file(n).read_bytes())
    # Only readings taken since the previous session ended: none it already recorded.
    assert len(ticks) == 4
    assert all(g.utilization_gpu_pct == 0.0 for t in ticks for g in t.gpus)
    assert [g.power_w for g in ticks[0].gpus] == [100.0, 100.0]


def test_pretrigger_off_reads_only_utilization(node: Callable[..., Node]) -> None:
    n = node({"GPUTEL_PRETRIGGER_SECONDS": "0"})
    calls: list[str] = []
    light = n.source.read_light

    def counted() -> list[GpuReading]:
        calls.append("light")
        return light()

    n.source.read_light = counted  # type: ignore[method-assign]
    for _ in range(6):
        n.tick(util=90.0)
    assert len(n.running) == 1
    assert n.agent.handoff is None and calls == [] and not head_file(n).exists()
    assert [g["power_w"] for g in n.agent.api.status()["gpus"]] == [None, None]


def test_hysteresis_timing_does_not_depend_on_the_pretrigger(tmp_path: Path) -> None:
    """The same readings give the same transitions at the same moments, ring or not."""
    pattern = [0, 0, 90, 5, 90, 90, 90, 90, 90, 15, 90, 0, 0, 0, 0, 0, 0, 0, 90, 90]
    seen: list[list[tuple[str, str, float]]] = []
    for seconds in ("0", "30"):
        n = Node(tmp_path / seconds, {"GPUTEL_PRETRIGGER_SECONDS": seconds})
        n.agent._setup()
        moments: list[tuple[str, str, float]] = []
        try:
            for util in pattern:
                before = len(n.agent.recent)
                n.tick(util=float(util))
                moments += [(r.from_state, r.to_state, n.clock()) for r in n.agent.recent][before:]
                if n.running:
                    n.beat()
        finally:
            n.agent._teardown()
        seen.append(moments)
    assert seen[0] == seen[1]
    start = n.clock() - len(pattern)  # the clock before the first reading
    # Busy from the 5th reading: active START_SECONDS (3) later, as without a pre-trigger.
    assert ("idle", "arming", start + 5) in seen[0] and ("arming", "active", start + 8) in seen[0]
