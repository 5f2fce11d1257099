"""The real ``gputel agent`` process on simulated GPUs, plus the agent's in-process pieces.

Subprocess runs use short intervals and sim patterns whose margins (blip vs START_SECONDS, quiet
spell vs STOP_SECONDS) are several ticks wide, so a loaded machine delays ticks without changing
what the agent decides: the sim timeline is read at the moment of each tick.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gputel import runtime
from gputel.control.client import request
from gputel.control.protocol import ControlError
from gputel.schema import GpuReading
from gputel.settings import Settings
from gputel.sources.base import GpuIdentity
from gputel.supervisor.agent import Agent, LazyEnergy
from gputel.supervisor.deadline import DeadlineRunner, run_with_deadline
from gputel.supervisor.events import METRICS as EVENT_METRICS

PROMTOOL = shutil.which("promtool") or (
    "/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float, what: str, step: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class NotifyListener:
    """A stand-in for systemd's notify socket: every datagram the agent sends, in order.

    systemd drains its socket at once; so must we, or the small datagram queue fills up.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[str] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)

    def _receive(self) -> None:
        while not self._done.is_set():
            with contextlib.suppress(TimeoutError):
                self.messages.append(self._sock.recv(4096).decode())

    def __enter__(self) -> NotifyListener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join(2)
        self._sock.close()


class AgentProc:
    def __init__(self, tmp: Path, extra_env: dict[str, str] | None = None) -> None:
        self.run_dir = tmp / "run"
        self.log_dir = tmp / "log"
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))}
        env.update(
            GPUTEL_BACKEND="sim",
            GPUTEL_SIM_GPUS="2",
            GPUTEL_INTERVAL="0.1",
            GPUTEL_RUN_DIR=str(self.run_dir),
            GPUTEL_LOG_DIR=str(self.log_dir),
            GPUTEL_EXPORTER_ADDR="127.0.0.1",
            GPUTEL_EXPORTER_PORT=str(self.port),
            # The machine's own kernel log is no test's business; a test names its file.
            GPUTEL_KMSG="",
        )
        env.update(extra_env or {})
        self.env = env
        tmp.mkdir(parents=True, exist_ok=True)
        self.stderr_path = tmp / "agent.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gputel", "agent"],
            env=env,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.try_status, 15, "the agent's control socket")

    def try_status(self) -> dict[str, Any] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited {self.proc.returncode}: {self.stderr()}")
        try:
            reply = request(self.run_dir, {"op": "status"}, timeout=2.0)
        except ControlError:
            return None
        return reply if reply.get("ok") else None

    def status(self) -> dict[str, Any]:
        reply = self.try_status()
        assert reply is not None
        return reply

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        return request(self.run_dir, message, timeout=2.0)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as r:
            return r.read().decode()

    def healthz(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
            return int(r.status)

    def transitions(self) -> list[dict[str, str]]:
        try:
            with open(self.log_dir / "transitions.csv", newline="") as fh:
                return list(csv.DictReader(fh))
        except FileNotFoundError:
            return []

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 8.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.fixture
def spawn_agent(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    agents: list[AgentProc] = []

    def make(extra_env: dict[str, str] | None = None, sub: str = "a") -> AgentProc:
        a = AgentProc(tmp_path / sub, extra_env)
        agents.append(a)
        return a

    yield make
    for a in agents:
        child = None
        try:
            hb = runtime.read_json(a.run_dir / runtime.RECORDER_STATE_FILE)
            child = hb.get("pid") if isinstance(hb, dict) else None
        except Exception:
            pass
        a.kill()
        if isinstance(child, int) and pid_alive(child):
            os.kill(child, signal.SIGKILL)


def promtool_ok(text: str) -> None:
    if PROMTOOL is None:
        pytest.skip("promtool not installed")
    r = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text.encode(), capture_output=True, timeout=20
    )
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types)), "duplicate metric families"


def rows(agent: AgentProc) -> list[tuple[str, str]]:
    return [(r["from_state"], r["to_state"]) for r in agent.transitions()]


# ---------------------------------------------------------------------------------- end to end
def test_hysteresis_blip_band_short_and_long_quiet(spawn_agent: Callable[..., AgentProc]) -> None:
    # 0.3 s blip (< 0.8 s start), then busy; a dip into the 10-20 % band and a 0.5 s quiet
    # spell (< 1.2 s stop) keep telemetry on; the final long quiet spell stops it.
    pattern = "0:0.5,90:0.3,0:0.6,90:1.8,15:0.6,90:0.5,0:0.5,90:0.6,0:30"
    agent = spawn_agent(
        {
            "GPUTEL_SIM_PATTERN": pattern,
            "GPUTEL_START_SECONDS": "0.8",
            "GPUTEL_STOP_SECONDS": "1.2",
            "GPUTEL_START_UTIL": "20",
            "GPUTEL_STOP_UTIL": "10",
        }
    )
    on = wait_for(
        lambda: (s := agent.status())["telemetry_active"] and s["child"] and s, 10, "telemetry on"
    )
    assert on["state"] in ("active", "cooling")
    child_pid = on["child"]["pid"]
    hb = wait_for(
        lambda: (
            (h := runtime.read_json(agent.run_dir / runtime.RECORDER_STATE_FILE))
            and h.get("pid") == child_pid
            and h
        ),
        10,
        "the recorder's heartbeat",
    )
    assert hb["files"]["gpu"]
    wait_for(lambda: ("telemetry_on", "telemetry_off") in rows(agent), 15, "telemetry off")
    assert rows(agent) == [
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
    st = agent.status()
    assert st["state"] == "idle" and st["telemetry_active"] is False
    assert [t["to_state"] for t in st["transitions"]][-1] == "telemetry_off"
    wait_for(lambda: not pid_alive(child_pid), 5, "the recorder to exit")
    # Idle exposition: agent series only (the GPU event counters are the agent's), even though
    # metrics.prom is still on disk.
    text = agent.metrics()
    assert "gputel_telemetry_active 0.0" in text
    readings = [
        line
        for line in text.splitlines()
        if "gputel_gpu_" in line and not any(m in line for m in EVENT_METRICS)
    ]
    assert readings == []
    promtool_ok(text)
    assert agent.terminate() == 0


def test_lifecycle_notify_metrics_crash_restart_and_shutdown(
    spawn_agent: Callable[..., AgentProc], tmp_path: Path
) -> None:
    notify_path = tmp_path / "n.sock"
    with NotifyListener(notify_path) as notify:
        messages = notify.messages
        agent = spawn_agent(
            {
                "GPUTEL_SIM_PATTERN": "0:0.6,90:120",
                "GPUTEL_START_SECONDS": "0.3",
                "NOTIFY_SOCKET": str(notify_path),
                "WATCHDOG_USEC": "400000",
            }
        )

        def drain() -> list[str]:
            return list(messages)

        wait_for(lambda: any(m.startswith("READY=1") for m in drain()), 5, "READY=1")
        assert agent.healthz() == 200
        promtool_ok(agent.metrics())  # idle, before the pattern turns busy

        # Active: the recorder's GPU series are joined in, still one family each.
        text = wait_for(
            lambda: "gputel_gpu_utilization_ratio" in (t := agent.metrics()) and t,
            15,
            "GPU series in /metrics",
        )
        assert "gputel_telemetry_active 1.0" in text
        promtool_ok(text)
        first = agent.status()["child"]
        assert first["restarts"] == 0

        # SIGKILL the recorder: the agent notices, counts a crash and starts another one.
        os.kill(first["pid"], signal.SIGKILL)
        again = wait_for(
            lambda: (c := agent.status()["child"]) and c["pid"] != first["pid"] and c,
            10,
            "a new recorder",
        )
        assert again["restarts"] == 1
        assert again["restarts_by_reason"] == {"crash": 1, "hung": 0}
        assert 'gputel_agent_child_restarts_total{reason="crash"} 1.0' in agent.metrics()

        # SIGHUP (logrotate's postrotate) reaches the recorder once it is up.
        wait_for(
            lambda: (
                (h := runtime.read_json(agent.run_dir / runtime.RECORDER_STATE_FILE))
                and h.get("pid") == again["pid"]
            ),
            10,
            "the new recorder's heartbeat",
        )
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "forwarded to the telemetry child" in agent.stderr(), 5, "SIGHUP")
        wait_for(lambda: "SIGHUP: new CSV files" in agent.stderr(), 5, "the recorder's SIGHUP")

        # A second agent on the same run directory is refused.
        second = subprocess.run(
            [sys.executable, "-m", "gputel", "agent"],
            env={
                k: v
                for k, v in {**agent.env, "GPUTEL_EXPORTER_PORT": "0"}.items()
                if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")
            },
            capture_output=True,
            timeout=20,
        )
        assert second.returncode == 1
        assert b"already running" in second.stderr

        drained = drain()
        assert any(m.startswith("STATUS=") and "telemetry on" in m for m in drained)
        assert drained.count("WATCHDOG=1") >= 3
        pings = drained.count("WATCHDOG=1")
        time.sleep(0.5)
        assert drain().count("WATCHDOG=1") > pings

        # SIGTERM: exit 0, recorder gone, socket removed, STOPPING sent.
        child_pid = again["pid"]
        t0 = time.monotonic()
        assert agent.terminate() == 0
        assert time.monotonic() - t0 < 6
        assert not pid_alive(child_pid)
        assert not (agent.run_dir / runtime.CONTROL_SOCKET).exists()
        wait_for(lambda: "STOPPING=1" in drain(), 2, "STOPPING=1")
        assert drain()[-1] == "STOPPING=1"


def test_no_gpu_mode_and_allocations_drive_telemetry(
    spawn_agent: Callable[..., AgentProc],
) -> None:
    agent = spawn_agent({"GPUTEL_BACKEND": "none", "GPUTEL_EXPORTER_PORT": "0"})
    st = agent.status()
    assert st["backend"] == "none" and st["gpus"] == [] and st["exporter"] is None
    assert st["telemetry_active"] is False

    reply = agent.ask({"op": "set_mode", "mode": "on", "for_s": 0.6})
    assert reply["ok"] and reply["mode"] == "on" and reply["until"]
    wait_for(lambda: agent.status()["telemetry_active"], 3, "telemetry for mode on")
    wait_for(lambda: agent.status()["mode"] == "auto", 5, "mode on to expire")
    assert agent.status()["telemetry_active"] is False

    reply = agent.ask({"op": "allocate", "id": "job-1", "gpus": None, "pid": None})
    assert reply["ok"] and reply["created"] is True
    wait_for(lambda: agent.status()["telemetry_active"], 3, "telemetry for the allocation")
    assert [a["id"] for a in agent.status()["allocations"]] == ["job-1"]
    assert agent.ask({"op": "list"})["allocations"][0]["id"] == "job-1"
    bad = agent.ask({"op": "allocate", "id": "bad id!", "gpus": None, "pid": None})
    assert bad["ok"] is False and "bad id" in bad["error"]

    assert agent.ask({"op": "set_mode", "mode": "off", "for_s": None})["ok"]
    wait_for(lambda: not agent.status()["telemetry_active"], 3, "mode off to win")
    assert agent.ask({"op": "set_mode", "mode": "auto", "for_s": None})["ok"]
    wait_for(lambda: agent.status()["telemetry_active"], 3, "the allocation again")
    assert agent.ask({"op": "release", "id": "job-1"})["released"] is True
    wait_for(lambda: not agent.status()["telemetry_active"], 3, "telemetry off")
    to_states = [t for _, t in rows(agent)]
    assert to_states == [
        "mode_on",
        "telemetry_on",
        "mode_auto",
        "telemetry_off",
        "telemetry_on",
        "mode_off",
        "telemetry_off",
        "mode_auto",
        "telemetry_on",
        "telemetry_off",
    ]
    assert agent.terminate() == 0


# ---------------------------------------------------------------------------------- in process
class StuckSource:
    """A GPU whose utilization read blocks until released, like NVML on a GPU off the bus."""

    name = "nvml"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(0, "GPU-x", "Stuck GPU")]

    def read_utilization(self) -> dict[int, float | None]:
        self.calls += 1
        if self.calls >= 3:
            self.release.wait(30)
        return {0: 50.0}

    def read_light(self) -> list[GpuReading]:
        return [GpuReading(0, "GPU-x", "Stuck GPU", utilization_gpu_pct=self.read_utilization()[0])]

    def read_energy_j(self) -> dict[int, float | None]:
        return {0: 1.0}

    def read(self) -> list[Any]:
        return []

    def close(self) -> None:
        pass


def test_stuck_gpu_read_degrades_but_loop_and_status_keep_going(tmp_path: Path) -> None:
    settings = Settings(
        backend="nvml",
        interval_s=0.1,
        start_seconds=60,
        kmsg="",
        run_dir=tmp_path / "run",
        log_dir=tmp_path / "log",
        exporter_port=0,
    )
    source = StuckSource()
    agent = Agent(settings, env={}, install_signals=False, source=source)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    try:
        st = wait_for(
            lambda: (r := _try(settings.run_dir)) and r.get("degraded") and r, 10, "degraded"
        )
        assert st["degraded"].startswith("GPU read stuck")
        assert st["gpus"][0]["utilization_gpu_pct"] is None
        calls = source.calls
        progress = agent._progress
        time.sleep(0.5)
        assert agent._progress > progress  # the loop keeps turning
        assert source.calls == calls  # and does not pile reads behind the stuck one
        assert agent.health()[0]
        assert "gputel_agent_gpu_read_degraded 1.0" in agent.metrics_bytes().decode()
        source.release.set()
        wait_for(lambda: (r := _try(settings.run_dir)) and r["degraded"] is None, 5, "recovery")
    finally:
        source.release.set()
        agent.request_stop()
        thread.join(10)
    assert not thread.is_alive()
    # /healthz turns 503 once the loop has not advanced for a while.
    agent._last_loop_at = time.monotonic() - agent.loop_stale_after_s - 1
    ok, text = agent.health()
    assert not ok and "not advanced" in text


def _try(run_dir: Path) -> dict[str, Any] | None:
    try:
        return request(run_dir, {"op": "status"}, timeout=2.0)
    except ControlError:
        return None


def test_deadline_runner_deadline_and_stuck() -> None:
    caller = DeadlineRunner()
    assert caller.call(lambda: 7, 1.0) == ("ok", 7)
    status, exc = caller.call(lambda: 1 / 0, 1.0)
    assert status == "error" and isinstance(exc, ZeroDivisionError)
    gate = threading.Event()
    assert caller.call(lambda: gate.wait(10), 0.05) == ("timeout", None)
    assert caller.call(lambda: 1, 1.0) == ("stuck", None)
    assert caller.stuck_for is not None
    gate.set()
    wait_for(lambda: caller.stuck_for is None, 2, "the stuck call to return")
    assert caller.call(lambda: 2, 1.0) == ("ok", 2)


def test_run_with_deadline_leaves_a_late_call_running() -> None:
    assert run_with_deadline(lambda: 3, 5.0).outcome() == ("ok", 3)
    status, exc = run_with_deadline(lambda: 1 / 0, 5.0).outcome()
    assert status == "error" and isinstance(exc, ZeroDivisionError)
    gate = threading.Event()
    late = run_with_deadline(lambda: gate.wait(10) and "late", 0.05)
    assert late.outcome() == ("timeout", None)
    gate.set()
    assert late.done.wait(5) and late.outcome() == ("ok", "late")


def test_lazy_energy_reads_only_when_used() -> None:
    calls = []

    def read() -> dict[int, float | None]:
        calls.append(1)
        return {0: 5.0}

    lazy = LazyEnergy(read)
    assert calls == []
    assert lazy.get(0) == 5.0 and lazy.get(1) is None and dict(lazy) == {0: 5.0}
    assert calls == [1]
