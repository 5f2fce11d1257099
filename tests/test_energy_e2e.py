"""One job across energy-counter restarts (a GPU reset, a driver reload) has one energy in all
four places: the release reply, allocations.csv, gputel report and the fleet report, each within
1 % of power × time. Over the fake driver, whose counter a thread advances at a fixed power."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fakedriver import FakeDriver, scenario
from gputel.formats import parse_iso_utc
from test_agent_e2e import AgentProc, wait_for

POWER_W = 300.0


class Counter:
    """The GPU's energy counter, advanced at POWER_W; :meth:`restart` sets it back to 0."""

    def __init__(self, driver: FakeDriver) -> None:
        self.driver = driver
        self.t0 = time.time()
        self.offset_mj = 5_000_000_000
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            mj = self.offset_mj + POWER_W * 1000 * (time.time() - self.t0)
            self.driver.set({"gpu.0.energy_mj": int(mj)})
            time.sleep(0.01)

    def restart(self) -> None:
        self.t0, self.offset_mj = time.time(), 0


def tagged_rows(log_dir: Path, ident: str) -> int:
    """GPU rows (one GPU here: ticks) tagged ``ident``."""
    count = 0
    for path in sorted(log_dir.glob("gpu-*.csv")):
        with open(path, newline="") as fh:
            count += sum(ident in row["allocations"].split(";") for row in csv.DictReader(fh))
    return count


def tagged_seconds(log_dir: Path, ident: str | None) -> float:
    """Σ over the rows tagged ``ident`` (every row when None) of the interval ending at each,
    from the row before it in its file: the time the rule counts power for."""
    total = 0.0
    for path in sorted(log_dir.glob("gpu-*.csv")):
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        for before, row in itertools.pairwise(rows):
            if ident is None or ident in row["allocations"].split(";"):
                dt = parse_iso_utc(row["timestamp"]) - parse_iso_utc(before["timestamp"])
                total += dt.total_seconds()
    return total


def near(a: float, b: float, rel: float) -> bool:
    return abs(a - b) <= rel * abs(b)


def test_a_job_across_counter_restarts_has_one_energy_everywhere(
    fake_driver: FakeDriver, driver_agents: Callable[..., AgentProc], tmp_path: Path
) -> None:
    fake_driver.write(
        scenario(1, **{"gpu.0.power_mw": int(POWER_W * 1000), "gpu.0.utilization.gpu_pct": 0})
    )
    counter = Counter(fake_driver)
    counter.thread.start()
    try:
        agent = driver_agents(GPUTEL_PRETRIGGER_SECONDS="0")
        reply = agent.ask({"op": "allocate", "id": "job-e", "gpus": [0], "pid": None})
        assert reply["ok"], reply
        state = agent.run_dir / "recorder.json"
        wait_for(
            lambda: (json.loads(state.read_text()) if state.exists() else {}).get("tick", 0) >= 5,
            30,
            "the recorder's ticks",
        )
        for _ in range(3):
            time.sleep(1.5)
            counter.restart()
        # Not a whole number of seconds: the release falls between two of the recorder's
        # publications (about once a second at this interval), not just after one.
        time.sleep(1.95)
        released = agent.ask({"op": "release", "id": "job-e"})
        assert released["released"] is True, released
        wait_for(lambda: agent.status().get("child") is None, 30, "telemetry to stop")
        agent.kill()
    finally:
        counter.stop.set()
        counter.thread.join(5)

    summary: dict[str, Any] = released["summary"]
    with open(agent.log_dir / "allocations.csv", newline="") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["id"] == "job-e"]
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "report", "--json", str(agent.log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    (alloc,) = [a for a in report["allocations"] if a["id"] == "job-e"]
    (node,) = report["nodes"]

    job_expected = POWER_W * tagged_seconds(agent.log_dir, "job-e")
    session_expected = POWER_W * tagged_seconds(agent.log_dir, None)
    places = {
        "release reply": summary["energy_j"],
        "allocations.csv": float(row["energy_j"]),
        "gputel report": alloc["energy_j"],
    }
    assert all(isinstance(v, float) for v in places.values()), places
    for where, joules in places.items():
        assert near(joules, alloc["energy_j"], 0.001), (where, places)
        assert near(joules, job_expected, 0.01), (where, joules, job_expected)
    fleet_j = node["energy_kwh"] * 3.6e6
    assert near(fleet_j, session_expected, 0.01), (fleet_j, session_expected)
    assert near(fleet_j, alloc["energy_j"], 0.02), (fleet_j, places)
    # The recorder publishes about once a second at this interval, yet the release asked it for
    # the allocation's end: its statistics cover every tagged row, not those of the last
    # publication.
    assert summary["samples"] == tagged_rows(agent.log_dir, "job-e"), summary


def test_the_running_total_survives_an_agent_restart(tmp_path: Path) -> None:
    """Simulated GPUs restart their counter with the agent: the allocation's energy goes on
    from the recorder state across the restart, and the release reply still equals the report."""
    env = {
        "GPUTEL_SIM_PATTERN": "60:3600",
        "GPUTEL_SIM_GPUS": "1",
        "GPUTEL_PRETRIGGER_SECONDS": "0",
    }
    first = AgentProc(tmp_path / "a", env)
    try:
        assert first.ask({"op": "allocate", "id": "job-r", "gpus": None, "pid": None})["ok"]
        state = first.run_dir / "recorder.json"
        wait_for(
            lambda: (json.loads(state.read_text()) if state.exists() else {}).get("tick", 0) >= 20,
            30,
            "the first recorder's ticks",
        )
        last = json.loads(state.read_text())
        before, old_pid = last["allocation_stats"]["job-r"]["energy_j"], last["pid"]
        first.proc.terminate()
        first.proc.wait(30)
    finally:
        first.kill()
    second = AgentProc(tmp_path / "a", env)
    try:
        wait_for(
            lambda: json.loads(state.read_text()).get("pid") != old_pid,
            30,
            "a recorder of the new agent",
        )
        time.sleep(2)
        released = second.ask({"op": "release", "id": "job-r"})
        assert released["released"] is True, released
        wait_for(lambda: second.status().get("child") is None, 30, "telemetry to stop")
    finally:
        second.kill()
    energy = released["summary"]["energy_j"]
    assert isinstance(energy, float) and energy > before > 0
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", "report", "--json", str(second.log_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    (alloc,) = [a for a in json.loads(proc.stdout)["allocations"] if a["id"] == "job-r"]
    assert near(energy, alloc["energy_j"], 0.001), (energy, alloc["energy_j"])
    assert len(list(second.log_dir.glob("gpu-*.csv"))) == 2
