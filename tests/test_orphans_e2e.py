"""A recorder child never outlives its agent and never overlaps another child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from gputel import runtime
from gputel.formats import process_start_time
from gputel.lineage import AGENT_ENV, Identity
from test_agent_e2e import AgentProc, pid_alive, spawn_agent, wait_for

__all__ = ["spawn_agent"]  # the fixture, used by name


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))}
    env.update(
        GPUTEL_BACKEND="sim",
        GPUTEL_SIM_GPUS="1",
        GPUTEL_INTERVAL="0.1",
        GPUTEL_LOG_DIR=str(tmp_path / "log"),
        GPUTEL_RUN_DIR=str(tmp_path / "run"),
    )
    env.update(extra)
    return env


def start_child(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gputel", "record", "--child"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def test_sigkill_of_the_agent_leaves_no_child_after_1_5_s(
    spawn_agent: Callable[..., AgentProc],
) -> None:
    # A long tick: a child that only looked at its parent once per tick would outlive the agent
    # by seconds.
    agent = spawn_agent({"GPUTEL_SIM_PATTERN": "0:3600", "GPUTEL_INTERVAL": "4"})
    assert agent.ask({"op": "set_mode", "mode": "on", "for_s": None})["ok"]
    child = wait_for(lambda: agent.status().get("child"), 20, "a recorder")["pid"]
    wait_for(
        lambda: (
            (hb := runtime.read_json(agent.run_dir / runtime.RECORDER_STATE_FILE))
            and hb.get("pid") == child
        ),
        20,
        "the recorder's first tick",
    )
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(10)
    t0 = time.monotonic()
    while pid_alive(child) and time.monotonic() - t0 < 1.5:
        time.sleep(0.02)
    assert not pid_alive(child), "the child outlived its agent by 1.5 s"


def test_a_child_started_under_a_dead_agent_exits_on_its_own(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    identity = Identity(gone.pid, process_start_time(gone.pid))
    gone.wait(10)
    child = start_child(child_env(tmp_path, **{AGENT_ENV: identity.as_env()}))
    try:
        assert child.wait(20) != 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert child.stderr is not None
    assert b"gone" in child.stderr.read()
    assert not list((tmp_path / "log").glob("gpu-*.csv")) if (tmp_path / "log").exists() else True


def test_a_new_child_stops_a_live_old_one_before_its_first_row(tmp_path: Path) -> None:
    env = child_env(tmp_path)
    old = start_child(env)
    new: subprocess.Popen[bytes] | None = None
    try:
        state = tmp_path / "run" / runtime.RECORDER_STATE_FILE
        wait_for(
            lambda: (hb := runtime.read_json(state)) and hb.get("pid") == old.pid,
            20,
            "the old child's first tick",
        )
        new = start_child(env)
        wait_for(
            lambda: (hb := runtime.read_json(state)) and hb.get("pid") == new.pid,
            20,
            "the new child's first tick",
        )
        # By the new child's first tick the old one has exited (it was asked to).
        assert old.poll() is not None
        holder = (tmp_path / "run" / runtime.RECORDER_LOCK).read_text().strip()
        assert holder == str(new.pid)
    finally:
        for p in (old, new):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(10)


def test_die_with_parent_sets_the_kernels_parent_death_signal() -> None:
    # In a process of its own: the request outlives the call and would bind pytest itself.
    code = (
        "import ctypes, signal\n"
        "from gputel.lineage import die_with_parent\n"
        "assert die_with_parent(signal.SIGTERM)\n"
        "got = ctypes.c_int(0)\n"
        "assert ctypes.CDLL(None).prctl(2, ctypes.byref(got), 0, 0, 0) == 0  # PR_GET_PDEATHSIG\n"
        "print(got.value)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(int(signal.SIGTERM))
