"""The pre-trigger: the agent's ring, the hand-off file, and the recorder writing the head rows.

The ring and the hand-off rules are tested with times passed in; the recorder side with the real
``gputel record --child`` command on simulated GPUs whose timeline (shared through
``_GPUTEL_SIM_EPOCH``) began before the child, as under an agent.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from gputel import runtime
from gputel.schema import GPU_CSV_COLUMNS, GPU_FIELDS, GpuReading
from gputel.settings import SettingsError, load_settings
from gputel.sources.base import LIGHT_FIELDS, GpuIdentity
from gputel.sources.sim import SimGpuSource
from gputel.supervisor.pretrigger import PretriggerRing, ring_ticks
from gputel.telemetry.head import (
    HeadTick,
    decode_head,
    encode_head,
    head_rows,
    take_head,
)
from test_agent_e2e import AgentProc, pid_alive, wait_for

T0 = datetime(2026, 11, 22, 3, 45, 12, tzinfo=timezone.utc)
DEVICES = [GpuIdentity(0, "GPU-a", "X"), GpuIdentity(1, "GPU-b", "X")]


def light(index: int, util: float, *, lost: bool = False, uuid: str | None = None) -> GpuReading:
    ident = DEVICES[index]
    if lost:
        return GpuReading(index, ident.uuid, ident.name, lost=True)
    return GpuReading(
        index,
        uuid or ident.uuid,
        ident.name,
        utilization_gpu_pct=util,
        memory_used_mib=100.0 + index,
        temperature_c=40.5,
        power_w=70.25,
        energy_j=1000.0 + util,
        sm_clock_mhz=None,
    )


# ---------------------------------------------------------------------------------- the ring
def test_ring_keeps_the_window_and_no_more() -> None:
    ring = PretriggerRing(3.0, 1.0, DEVICES)
    assert ring.capacity == ring_ticks(3.0, 1.0) == 4
    for k in range(10):
        ring.add(100.0 + k, T0.timestamp() + k, [light(0, k), light(1, k)])
        assert len(ring) <= ring.capacity
    ticks = ring.ticks()
    # The window ending at the newest tick: 106..109 (3 s back, both ends included).
    assert [t.monotonic for t in ticks] == [106.0, 107.0, 108.0, 109.0]
    assert [t.timestamp for t in ticks] == [T0 + timedelta(seconds=k) for k in range(6, 10)]
    assert [g.utilization_gpu_pct for g in ticks[-1].gpus] == [9.0, 9.0]
    # Asked later (the agent stalled), only what is still inside the window.
    assert [t.monotonic for t in ring.ticks(now=110.5)] == [108.0, 109.0]


def test_ring_is_bounded_by_ticks_when_time_does_not_advance() -> None:
    ring = PretriggerRing(30.0, 1.0, DEVICES)
    for _ in range(1000):
        ring.add(5.0, T0.timestamp(), [light(0, 1.0)])
    assert len(ring) == ring.capacity == 31


def test_ring_readings_round_trip_with_empty_and_lost() -> None:
    ring = PretriggerRing(10.0, 1.0, DEVICES)
    ring.add(1.0, T0.timestamp(), [light(0, 55.0), light(1, 0.0, lost=True)])
    ring.add(2.0, T0.timestamp() + 1, [light(1, 20.0)])  # GPU 0 missing from the read
    first, second = ring.ticks()
    g0, g1 = first.gpus
    assert g0 == light(0, 55.0)  # sm_clock_mhz None stays None, not NaN or 0
    assert g1.lost and all(getattr(g1, f) is None for f in LIGHT_FIELDS)
    assert all(getattr(second.gpus[0], f) is None for f in LIGHT_FIELDS)
    assert not second.gpus[0].lost and second.gpus[1] == light(1, 20.0)


def test_ring_off() -> None:
    ring = PretriggerRing(0.0, 1.0, DEVICES)
    ring.add(1.0, T0.timestamp(), [light(0, 1.0)])
    assert not ring.enabled and ring.ticks() == []


# ---------------------------------------------------------------------------------- settings
def test_setting_default_off_and_bad_values() -> None:
    assert load_settings(env={}).pretrigger_s == 30.0
    assert load_settings(env={"GPUTEL_PRETRIGGER_SECONDS": "0"}).pretrigger_s == 0.0
    assert load_settings(env={"GPUTEL_PRETRIGGER_SECONDS": "1.5m"}).pretrigger_s == 90.0
    for bad in ("-1", "x", "601", "nan"):
        with pytest.raises(SettingsError, match="GPUTEL_PRETRIGGER_SECONDS"):
            load_settings(env={"GPUTEL_PRETRIGGER_SECONDS": bad})
    with pytest.raises(SettingsError, match="3600 ticks"):
        load_settings(env={"GPUTEL_PRETRIGGER_SECONDS": "60", "GPUTEL_INTERVAL": "0.01"})


def test_bad_setting_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "status", "--json"],
        env={**os.environ, "GPUTEL_PRETRIGGER_SECONDS": "forever", "GPUTEL_RUN_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "GPUTEL_PRETRIGGER_SECONDS" in proc.stderr


# ---------------------------------------------------------------------------------- hand-off
def ticks_at(*seconds: float, uuid: str | None = None) -> list[HeadTick]:
    return [
        HeadTick(T0 + timedelta(seconds=s), 100.0 + s, (light(1, s, uuid=uuid), light(0, s)))
        for s in seconds
    ]


def test_file_round_trip_and_taken_once(tmp_path: Path) -> None:
    lost = HeadTick(T0 + timedelta(seconds=1), 101.0, (light(0, 0, lost=True),))
    ticks = [*ticks_at(0.0, 0.5), lost]
    assert decode_head(encode_head(ticks)) == ticks
    path = tmp_path / runtime.PRETRIGGER_FILE
    path.write_bytes(encode_head(ticks))
    assert take_head(path) == ticks
    assert not path.exists() and take_head(path) == []


def test_a_damaged_file_is_no_head_and_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / runtime.PRETRIGGER_FILE
    for data in (b"{", b'{"version": 9}', b'{"version":1,"fields":["x"],"gpus":[],"ticks":[]}'):
        path.write_bytes(data)
        assert take_head(path) == []
        assert not path.exists()
    assert len([r for r in caplog.records if "pre-trigger" in r.getMessage()]) == 3


def test_head_rows_order_dedupe_and_cut_at_the_first_row() -> None:
    # Out of order, a repeated millisecond, and ticks at and after the first own row.
    ticks = ticks_at(0.0, 1.0, 0.5, 1.0, 1.0004, 2.0, 3.0)
    rows = head_rows(ticks, T0 + timedelta(seconds=2), 102.0, DEVICES, 1.0)
    assert [t.monotonic for t in rows] == [100.0, 101.0]
    # GPUs in the recorder's order, whatever the order in the file.
    assert all([g.index for g in t.gpus] == [0, 1] for t in rows)


def test_head_rows_drop_other_gpus_and_stale_heads() -> None:
    ticks = ticks_at(0.0, 1.0, uuid="GPU-other")
    rows = head_rows(ticks, T0 + timedelta(seconds=2), 102.0, DEVICES, 1.0)
    assert all([g.index for g in t.gpus] == [0] for t in rows)  # GPU 1 is another board now
    assert head_rows(ticks, T0 + timedelta(seconds=2), 102.0, DEVICES[1:], 1.0) == []
    # A head left behind by an agent that died: older than a minute before the first tick.
    assert head_rows(ticks_at(0.0, 1.0), T0 + timedelta(minutes=5), 400.0, DEVICES, 1.0) == []


# ---------------------------------------------------------------------------------- recorder
def test_child_writes_the_head_before_its_own_rows(tmp_path: Path) -> None:
    """A child started while the GPUs have been busy for 2 s begins its file 3 s back."""
    interval = 0.05
    run_dir, log_dir = tmp_path / "run", tmp_path / "log"
    runtime.ensure_run_dir(run_dir)
    pattern = "0:1,90:600"  # busy from 1 s after the epoch
    now_mono, now_wall = time.monotonic(), time.time()
    epoch = now_mono - 3.0
    clock = {"t": 0.0}
    agent_source = SimGpuSource(2, pattern, None, epoch=epoch, clock=lambda: clock["t"])
    ring = PretriggerRing(30.0, interval, agent_source.devices())
    t = epoch
    while t < now_mono:
        clock["t"] = t
        ring.add(t, now_wall - (now_mono - t), agent_source.read_light())
        t += interval
    (run_dir / runtime.PRETRIGGER_FILE).write_bytes(encode_head(ring.ticks()))
    cmd = [
        sys.executable, "-m", "gputel", "record", "--child",
        "--backend", "sim", "--sim-gpus", "2", "--sim-pattern", pattern,
        "--interval", str(interval), "--log-dir", str(log_dir), "--run-dir", str(run_dir),
        "--sysfs-root", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, runtime.SIM_EPOCH_ENV: repr(epoch)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            state = runtime.read_json(run_dir / runtime.RECORDER_STATE_FILE)
            if state and state["tick"] >= 5:
                break
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert not (run_dir / runtime.PRETRIGGER_FILE).exists()
    assert state["pretrigger"]["ticks"] >= 55 and state["pretrigger"]["seconds"] >= 2.7

    (gpu_file,) = log_dir.glob("gpu-*.csv")
    text = gpu_file.read_text()
    assert text.count("timestamp,") == 1 and text.splitlines()[0].split(",") == list(
        GPU_CSV_COLUMNS
    )
    with open(gpu_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    stamps = [rows[k]["timestamp"] for k in range(0, len(rows), 2)]
    assert stamps == sorted(set(stamps))  # strictly increasing: no tick twice
    assert all(
        [r["gpu"] for r in rows[k : k + 2]] == ["0", "1"]
        and rows[k]["timestamp"] == rows[k + 1]["timestamp"]
        for k in range(0, len(rows), 2)
    )
    n_head = 2 * state["pretrigger"]["ticks"]
    head, own = rows[:n_head], rows[n_head:]
    assert {r["pretrigger"] for r in head} == {"1"} and {r["pretrigger"] for r in own} == {"0"}
    # The first row is from before the GPUs got busy (1 s after the epoch).
    first = datetime.fromisoformat(rows[0]["timestamp"].replace("Z", "+00:00"))
    busy_at = datetime.fromtimestamp(now_wall - 2.0, timezone.utc)
    assert first <= busy_at
    assert head[0]["utilization_gpu_pct"] == "0.0" and head[-1]["utilization_gpu_pct"] == "90.0"
    by_csv = {f.csv: f for f in GPU_FIELDS}
    for r in head:
        for col, f in by_csv.items():
            if f.attr in LIGHT_FIELDS:
                assert r[col] != "", col
            else:
                assert r[col] == "", col  # the agent did not read it
    assert all(r["power_limit_w"] == "700.00" for r in own)
    # One energy count through the whole file: it starts at the head and never goes back.
    for gpu in ("0", "1"):
        energy = [float(r["energy_j"]) for r in rows if r["gpu"] == gpu]
        assert energy[0] == 0.0 and energy == sorted(energy)
    # The head has no host rows: the host file starts with the child's own first tick.
    (host_file,) = log_dir.glob("host-*.csv")
    with open(host_file, newline="") as fh:
        host_rows = list(csv.DictReader(fh))
    assert host_rows[0]["timestamp"] == own[0]["timestamp"]


# ---------------------------------------------------------------------------------- the agent
@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], AgentProc]]:
    """The real ``gputel agent`` on two simulated GPUs; it and its child are gone afterwards."""
    agents: list[AgentProc] = []

    def make(env: dict[str, str]) -> AgentProc:
        agents.append(AgentProc(tmp_path / f"a{len(agents)}", env))
        return agents[-1]

    yield make
    for a in agents:
        hb = runtime.read_json(a.run_dir / runtime.RECORDER_STATE_FILE)
        a.kill()
        child = hb.get("pid") if isinstance(hb, dict) else None
        if isinstance(child, int) and pid_alive(child):
            os.kill(child, signal.SIGKILL)


def _stamp(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _session_rows(agent: AgentProc) -> tuple[list[dict[str, str]], str]:
    """The one gpu file's rows after the agent stopped, checked for order; and its text."""
    (gpu_file,) = agent.log_dir.glob("gpu-*.csv")
    text = gpu_file.read_text()
    assert text.count("timestamp,") == 1
    assert text.splitlines()[0].split(",") == list(GPU_CSV_COLUMNS)
    with open(gpu_file, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) % 2 == 0
    stamps = []
    for k in range(0, len(rows), 2):
        pair = rows[k : k + 2]
        assert [r["gpu"] for r in pair] == ["0", "1"] and pair[0]["timestamp"] == pair[1][
            "timestamp"
        ]
        stamps.append(pair[0]["timestamp"])
    assert stamps == sorted(set(stamps))  # strictly increasing: no tick twice
    for gpu in ("0", "1"):
        energy = [float(r["energy_j"]) for r in rows if r["gpu"] == gpu]
        assert energy[0] == 0.0 and energy == sorted(energy)
    return rows, text


def _transition(agent: AgentProc, to_state: str) -> datetime:
    return _stamp(next(t for t in agent.transitions() if t["to_state"] == to_state)["timestamp"])


def _until_recording(agent: AgentProc, ticks: int = 5) -> None:
    def recording() -> bool:
        hb = runtime.read_json(agent.run_dir / runtime.RECORDER_STATE_FILE)
        return isinstance(hb, dict) and hb.get("tick", 0) >= ticks

    wait_for(recording, 30, "the recorder's ticks")
    assert agent.terminate() == 0


def test_a_load_that_starts_at_t_has_its_first_row_before_t(
    spawn_agent: Callable[[dict[str, str]], AgentProc],
) -> None:
    """Default pre-trigger: the session's file begins with the idle readings before the load."""
    agent = spawn_agent(
        {
            "GPUTEL_INTERVAL": "0.05",
            "GPUTEL_SIM_PATTERN": "0:2,90:600",  # busy 2 s after the agent started
            "GPUTEL_START_SECONDS": "0.5",
        }
    )
    _until_recording(agent)
    rows, _ = _session_rows(agent)
    first_busy = next(r for r in rows if r["utilization_gpu_pct"] == "90.0")
    arming, on = _transition(agent, "arming"), _transition(agent, "telemetry_on")
    # Rows read while the GPUs were idle, i.e. before the load started at t, lead the file...
    assert rows[0]["utilization_gpu_pct"] == "0.0"
    assert _stamp(rows[0]["timestamp"]) < _stamp(first_busy["timestamp"]) <= arming
    # ...reaching back well before telemetry came on (2 s idle + 0.5 s arming).
    assert on - _stamp(rows[0]["timestamp"]) >= timedelta(seconds=1.5)
    head = [r for r in rows if r["pretrigger"] == "1"]
    own = rows[len(head) :]
    assert head and own and all(r["pretrigger"] == "0" for r in own)
    assert all(r["utilization_memory_pct"] == "" for r in head)  # the agent does not read it
    assert _stamp(head[-1]["timestamp"]) < _stamp(own[0]["timestamp"])
    assert not (agent.run_dir / runtime.PRETRIGGER_FILE).exists()


def test_a_session_started_by_the_operator_gets_the_head(
    spawn_agent: Callable[[dict[str, str]], AgentProc],
) -> None:
    agent = spawn_agent(
        {
            "GPUTEL_INTERVAL": "0.05",
            "GPUTEL_SIM_PATTERN": "0:600",
            "GPUTEL_PRETRIGGER_SECONDS": "1",
        }
    )
    time.sleep(2.0)  # idle readings, more than the window
    started = subprocess.run(
        [sys.executable, "-m", "gputel", "start"],
        env=agent.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 0, started.stderr
    _until_recording(agent)
    rows, _ = _session_rows(agent)
    on = _transition(agent, "telemetry_on")
    lead = on - _stamp(rows[0]["timestamp"])
    # The 1 s window before the start, and no more (two ticks of slack for a slow machine).
    assert timedelta(seconds=0.7) <= lead <= timedelta(seconds=1.1)


def test_pretrigger_zero_starts_the_file_at_the_session(
    spawn_agent: Callable[[dict[str, str]], AgentProc],
) -> None:
    agent = spawn_agent(
        {
            "GPUTEL_INTERVAL": "0.05",
            "GPUTEL_SIM_PATTERN": "0:1,90:600",
            "GPUTEL_START_SECONDS": "0.3",
            "GPUTEL_PRETRIGGER_SECONDS": "0",
        }
    )
    _until_recording(agent)
    rows, _ = _session_rows(agent)
    assert _stamp(rows[0]["timestamp"]) >= _transition(agent, "telemetry_on")
    assert all(r["pretrigger"] == "0" and r["utilization_memory_pct"] != "" for r in rows)
    assert all(r["utilization_gpu_pct"] == "90.0" for r in rows)
