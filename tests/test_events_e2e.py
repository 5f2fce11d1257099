"""GPU events end to end: the real ``gputel agent`` over the binding and the fake driver.

An Xid arrives while the node idles: a row in ``events.csv`` naming the allocation it hit, the
counter on ``/metrics``, the event in ``gputel status``, and a capture session that ends when
its window does. Repeats and other GPUs count on their own labels; a wait that never returns
does not hold up SIGTERM; a driver without events is one notice. Simulated events
(``GPUTEL_SIM_EVENTS``) take the same way.
"""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from fakedriver import EVENT_XID, UNKNOWN, FakeDriver
from gputel.supervisor.xid import xid_info
from test_agent_e2e import AgentProc, promtool_ok, wait_for

UUID0 = "GPU-fake-0000-0000-0000-0000-000000000000"
UUID1 = "GPU-fake-0001-0000-0000-0000-000000000000"


def events_csv(agent: AgentProc) -> list[dict[str, str]]:
    try:
        with open(agent.log_dir / "events.csv", newline="") as fh:
            return list(csv.DictReader(fh))
    except FileNotFoundError:
        return []


def counter(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in an exposition, by its labels (any order of the rest)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def gpu_rows(agent: AgentProc) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted(agent.log_dir.glob("gpu-*.csv")):
        with open(path, newline="") as fh:
            out.extend(csv.DictReader(fh))
    return out


def test_an_xid_while_idle_is_recorded_counted_shown_and_captured(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    agent = driver_agents(GPUTEL_EVENT_CAPTURE_SECONDS="1.5")
    assert agent.status()["state"] == "idle" and not agent.status()["telemetry_active"]
    fake_driver.set({"event.1": f"0,{EVENT_XID},79"})

    (row,) = wait_for(lambda: events_csv(agent), 15, "the events.csv row")
    assert row == {
        "timestamp": row["timestamp"],
        "gpu": "0",
        "uuid": UUID0,
        "event": "xid",
        "xid": "79",
        "detail": xid_info(79).detail + "; source=nvml",
        "allocations": "",
    }
    text = agent.metrics()
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="0", uuid=UUID0, xid="79") == 1.0
    assert counter(text, "gputel_gpu_events_total", gpu="0", uuid=UUID0, event="xid") == 1.0
    promtool_ok(text)
    (shown,) = agent.status()["events"]
    assert (shown["gpu"], shown["uuid"], shown["event"], shown["xid"], shown["action"]) == (
        0,
        UUID0,
        "xid",
        79,
        "drain",
    )
    assert shown["timestamp"] == row["timestamp"]

    # The capture: telemetry on while the GPUs idle, named after the event, then off again.
    reason = "capture after Xid 79 on GPU 0"
    wait_for(lambda: gpu_rows(agent), 15, "rows recorded by the capture session")
    wait_for(lambda: not agent.status()["telemetry_active"], 15, "the capture window to end")
    moves = [(r["from_state"], r["to_state"], r["reason"]) for r in agent.transitions()]
    assert ("telemetry_off", "telemetry_on", reason) in moves
    assert moves[-1][:2] == ("telemetry_on", "telemetry_off")
    assert agent.status()["state"] == "idle"

    # Repeats count; another GPU counts on its own labels and names the allocation it hit.
    assert agent.ask({"op": "allocate", "id": "job-7", "gpus": [1]})["ok"]
    fake_driver.set({"event.2": f"0,{EVENT_XID},79", "event.3": f"1,{EVENT_XID},13"})
    wait_for(lambda: len(events_csv(agent)) == 3, 15, "two more rows")
    by_gpu = {r["gpu"]: r for r in events_csv(agent)[1:]}
    assert by_gpu["0"]["allocations"] == "" and by_gpu["1"]["allocations"] == "job-7"
    assert by_gpu["1"]["uuid"] == UUID1 and by_gpu["1"]["xid"] == "13"
    text = agent.metrics()
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="0", uuid=UUID0, xid="79") == 2.0
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="1", uuid=UUID1, xid="13") == 1.0
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="1", xid="79") is None
    assert counter(text, "gputel_gpu_events_total", gpu="1", uuid=UUID1, event="xid") == 1.0
    assert [e["xid"] for e in agent.status()["events"]] == [79, 79, 13]
    assert agent.terminate() == 0


def test_operator_off_wins_over_a_capture(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    agent = driver_agents(GPUTEL_EVENT_CAPTURE_SECONDS="60")
    assert agent.ask({"op": "set_mode", "mode": "off", "for_s": None})["ok"]
    wait_for(lambda: agent.status()["telemetry_reason"] == "operator mode off", 15, "mode off")
    fake_driver.set({"event.1": f"1,{EVENT_XID},48"})
    wait_for(lambda: agent.status()["events"] and events_csv(agent), 15, "the event recorded")
    status = agent.status()
    assert not status["telemetry_active"] and status["telemetry_reason"] == "operator mode off"
    assert events_csv(agent)[0]["xid"] == "48"
    # Back to auto: the capture window is still open, so telemetry goes on for it.
    assert agent.ask({"op": "set_mode", "mode": "auto", "for_s": None})["ok"]
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    assert agent.status()["telemetry_reason"] == "capture after Xid 48 on GPU 1"
    assert agent.terminate() == 0


def test_a_wait_that_never_returns_does_not_delay_sigterm(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    fake_driver.set({"event_wait.sleep_ms": 600_000, "event.1": f"0,{EVENT_XID},79"})
    agent = driver_agents()
    # The loop, status and the exporter go on while the listener is stuck in the driver.
    fake_driver.set(gpu__0__utilization__gpu_pct=85)
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    assert "gputel_gpu_xid_errors_total" in agent.metrics()
    assert events_csv(agent) == []
    # A blocked wait would keep the process for 600 s; the agent exits on SIGTERM regardless.
    assert agent.terminate(timeout=15) == 0


def test_a_driver_without_events_is_one_notice_and_the_rest_works(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    fake_driver.set(gpu__0__supported_events=0, gpu__1__supported_events=0)
    agent = driver_agents()
    wait_for(lambda: agent.status()["notice"], 15, "the notice")
    assert "GPU events (Xid, ECC) are not received" in agent.status()["notice"]
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    wait_for(lambda: len(gpu_rows(agent)) >= 4, 20, "recorded rows")
    text = agent.metrics()
    assert "# TYPE gputel_gpu_xid_errors_total counter" in text
    assert counter(text, "gputel_gpu_xid_errors_total") is None
    promtool_ok(text)
    human = subprocess.run(
        [sys.executable, "-m", "gputel", "status"],
        env=agent.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "GPU events (Xid, ECC) are not received" in " ".join(human.stdout.split())
    assert agent.terminate() == 0
    assert agent.stderr_path.read_text().count("GPU events (Xid, ECC) are not received") == 1


def test_failing_waits_are_one_notice(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver
) -> None:
    fake_driver.set({"event_wait.error": UNKNOWN})
    agent = driver_agents()
    wait_for(lambda: agent.status()["notice"], 15, "the notice")
    assert "waiting for GPU events fails" in agent.status()["notice"]
    fake_driver.set(gpu__1__utilization__gpu_pct=85)
    wait_for(lambda: agent.status()["telemetry_active"], 15, "telemetry on")
    assert agent.terminate() == 0
    assert agent.stderr_path.read_text().count("waiting for GPU events fails") == 1


def test_simulated_events_reach_events_csv_status_and_metrics(tmp_path: Path) -> None:
    agent = AgentProc(
        tmp_path,
        {
            "GPUTEL_SIM_PATTERN": "0:600",
            "GPUTEL_SIM_EVENTS": "0:79@0.3,1:13@0.5,1:13@0.5",
            "GPUTEL_EVENT_CAPTURE_SECONDS": "0",
        },
    )
    try:
        wait_for(lambda: len(events_csv(agent)) == 3, 15, "three events.csv rows")
        rows = [(r["gpu"], r["uuid"], r["xid"]) for r in events_csv(agent)]
        assert rows == [
            ("0", "GPU-sim-00000000-0000-0000-0000-000000000000", "79"),
            ("1", "GPU-sim-00000000-0000-0000-0000-000000000001", "13"),
            ("1", "GPU-sim-00000000-0000-0000-0000-000000000001", "13"),
        ]
        status = agent.status()
        assert [(e["gpu"], e["xid"], e["action"]) for e in status["events"]] == [
            (0, 79, "drain"),
            (1, 13, "app"),
            (1, 13, "app"),
        ]
        # Capture off (0): the idle node stays off.
        assert not status["telemetry_active"]
        assert counter(agent.metrics(), "gputel_gpu_xid_errors_total", gpu="1", xid="13") == 2.0
        human = subprocess.run(
            [sys.executable, "-m", "gputel", "status"],
            env=agent.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "recent GPU events" in human.stdout and "drain" in human.stdout
        assert agent.terminate() == 0
    finally:
        agent.kill()
