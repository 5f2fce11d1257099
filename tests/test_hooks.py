"""The hook API: the environment gate, the two-second promise, and many callers at once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_doubles import ServedAgent
from gputel import hooks
from gputel.control.allocations import AllocationStore
from gputel.control.client import agent_answers, request
from gputel.control.protocol import AgentUnavailable

BOUND_S = 2.0
GPUTEL = str(Path(sys.executable).with_name("gputel"))


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment for gputel processes working in ``tmp_path`` on simulated GPUs."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GPUTEL_", "_GPUTEL_")) and k != "GPU_TELEMETRY_AUTOSTART"
    }
    env.update(
        GPUTEL_RUN_DIR=str(tmp_path / "run"),
        GPUTEL_LOG_DIR=str(tmp_path / "log"),
        GPUTEL_BACKEND="sim",
        GPUTEL_SIM_PATTERN="0:3600",
        GPUTEL_EXPORTER_PORT="0",
        GPUTEL_INTERVAL="0.2",
    )
    env.update(extra)
    return env


def stop_agent(run_dir: Path) -> None:
    """Stop the agent serving ``run_dir`` (one the test started), by the pid it reports."""
    try:
        pid = request(run_dir, {"op": "status"}, timeout=2.0).get("pid")
    except Exception:
        return
    if not isinstance(pid, int):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running_agent(tmp_path: Path, **extra: str) -> Iterator[Path]:
    """A real ``gputel agent`` on simulated GPUs in ``tmp_path``; yields its run directory."""
    run = tmp_path / "run"
    with open(tmp_path / "agent.log", "wb") as log:
        proc = subprocess.Popen(
            [GPUTEL, "agent"], env=env_for(tmp_path, **extra), stdout=log, stderr=log
        )
    try:
        deadline = time.monotonic() + 15
        while not agent_answers(run, timeout=0.5):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not start: {(tmp_path / 'agent.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield run
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    monkeypatch.setenv("GPUTEL_RUN_DIR", str(run))
    monkeypatch.setenv("GPUTEL_LOG_DIR", str(tmp_path / "log"))
    monkeypatch.setenv("GPUTEL_BACKEND", "sim")
    monkeypatch.setenv("GPUTEL_EXPORTER_PORT", "0")
    return run


@pytest.fixture
def enabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPU_TELEMETRY_AUTOSTART", "1")


@pytest.fixture
def agent(run_dir: Path, tmp_path: Path) -> Iterator[ServedAgent]:
    with ServedAgent(run_dir, tmp_path / "log") as fake:
        yield fake


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any]]:
    """Record background helpers instead of starting them."""
    started: list[tuple[str, Any, Any]] = []

    def fake(ident: str, gpus: Any, pid: Any) -> None:
        started.append((ident, gpus, pid))
        return None

    monkeypatch.setattr(hooks, "_start_helper", fake)
    return started


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[hooks.HookResult, float]:
    t0 = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - t0


# ---------------------------------------------------------------------------------- the gate
@pytest.mark.parametrize("value", [None, "", "0", "false", "no", "off", "junk", "2", "enabled"])
def test_disabled_unless_true(
    value: str | None, monkeypatch: pytest.MonkeyPatch, agent: ServedAgent
) -> None:
    if value is not None:
        monkeypatch.setenv("GPU_TELEMETRY_AUTOSTART", value)
    result = hooks.allocation_created("job-1", gpus=[0])
    assert result == hooks.HookResult(True, "disabled", result.detail)
    assert "GPU_TELEMETRY_AUTOSTART" in result.detail
    assert hooks.allocation_released("job-1").action == "disabled"
    with hooks.allocation("job-2") as res:
        assert res.action == "disabled"
    assert agent.requests == []


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "True", "yes", "YES", "on", "On", " on "])
def test_enabled_by_each_true_word(
    value: str, monkeypatch: pytest.MonkeyPatch, agent: ServedAgent
) -> None:
    monkeypatch.setenv("GPU_TELEMETRY_AUTOSTART", value)
    result = hooks.allocation_created("job-1", gpus=[0])
    assert result.ok and result.action == "registered", result
    assert [a["id"] for a in agent.store.list()] == ["job-1"]


def test_result_is_small_frozen_dataclass() -> None:
    r = hooks.HookResult(True, "registered", "x")
    with pytest.raises(AttributeError):
        r.ok = False  # type: ignore[misc]
    assert r.summary is None


# ---------------------------------------------------------------------------------- happy path
@pytest.mark.usefixtures("enabled")
def test_create_release_with_summary(agent: ServedAgent) -> None:
    agent.energy = {0: 100.0, 1: 200.0}
    assert hooks.allocation_created("job-42", gpus=[0, 1]).action == "registered"
    assert hooks.allocation_created("job-42", gpus=[0, 1]).action == "already-open"
    agent.energy = {0: 150.5, 1: 260.0}
    result = hooks.allocation_released("job-42")
    assert result.ok and result.action == "released"
    assert result.summary is not None
    assert result.summary["energy_j"] == 110.5
    assert result.summary["gpus"] == [0, 1]
    again = hooks.allocation_released("job-42")
    assert again.ok and again.action == "not-open"


@pytest.mark.usefixtures("enabled")
def test_a_starting_agent_is_asked_again(agent: ServedAgent) -> None:
    """The agent answers "code": "starting" until its store is open; the hook asks again."""
    store = agent.agent.store
    agent.agent.store = None
    timer = threading.Timer(0.3, lambda: setattr(agent.agent, "store", store))
    timer.start()
    try:
        result, took = timed(hooks.allocation_created, "job-s", gpus=[0])
    finally:
        timer.join()
    assert took < BOUND_S
    assert result.action == "registered", result
    assert [r["op"] for r in agent.requests].count("allocate") >= 2
    assert [a["id"] for a in agent.store.list()] == ["job-s"]


@pytest.mark.usefixtures("enabled")
def test_an_agent_starting_past_the_budget_leaves_it_pending(
    agent: ServedAgent, no_start: list[Any]
) -> None:
    agent.agent.store = None
    result, took = timed(hooks.allocation_created, "job-p", gpus=None)
    assert took < BOUND_S
    assert result.action == "pending" and no_start == [("job-p", None, None)]


@pytest.mark.usefixtures("enabled")
def test_context_manager(agent: ServedAgent) -> None:
    with hooks.allocation("ctx", gpus=[1]) as res:
        assert res.action == "registered"
        (alloc,) = agent.store.list()
        assert alloc["gpus"] == [1] and alloc["pid"] is None
    assert agent.store.list() == []
    with hooks.allocation("owned", pid=os.getpid()):
        assert agent.store.list()[0]["pid"] == os.getpid()
    assert agent.store.list() == []
    with pytest.raises(ZeroDivisionError), hooks.allocation("ctx2"):
        assert [a["id"] for a in agent.store.list()] == ["ctx2"]
        _ = 1 / 0
    assert agent.store.list() == []


@pytest.mark.usefixtures("enabled")
def test_refusals_are_results_and_write_nothing(agent: ServedAgent, tmp_path: Path) -> None:
    for ident, gpus in [("bad id", None), ("../x", None), ("x" * 129, None), ("ok", [7])]:
        result = hooks.allocation_created(ident, gpus=gpus)
        assert not result.ok and result.action == "failed"
    assert "not present" in hooks.allocation_created("ok", gpus=[7]).detail
    for gpus in ([0, 0], [], ["0"], [-1], "0,1"):
        assert hooks.allocation_created("ok", gpus=gpus).action == "failed"  # type: ignore[arg-type]
    assert hooks.allocation_created(None).action == "failed"  # type: ignore[arg-type]
    assert hooks.allocation_released("a/b").action == "failed"
    assert not (agent.run_dir / "allocations.json").exists()
    assert not (tmp_path / "log" / "allocations.csv").exists()
    # Only the one with a well-formed request reached the agent.
    assert {r["id"] for r in agent.requests} == {"ok"}


@pytest.mark.usefixtures("enabled")
def test_invalid_settings_do_not_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUTEL_INTERVAL", "often")
    result = hooks.allocation_created("a")
    assert result.action == "failed" and "GPUTEL_INTERVAL" in result.detail
    assert hooks.allocation_released("a").action == "failed"


# ---------------------------------------------------------------------------------- the bound
@pytest.mark.usefixtures("enabled")
def test_hung_agent_bounded(run_dir: Path, no_start: list[Any]) -> None:
    """A socket that accepts and never answers."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / "control.sock"))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        for call in (
            lambda: hooks.allocation_created("hung", gpus=[0]),
            lambda: hooks.allocation_released("hung"),
        ):
            result, took = timed(call)
            assert took < BOUND_S, took
            assert not result.ok and result.action == "failed"
            assert "answer" in result.detail
        with hooks.allocation("hung-ctx"):
            pass
    finally:
        stop.set()
        t.join()
        listener.close()
        for s in held:
            s.close()
    assert no_start == []


@pytest.mark.usefixtures("enabled")
def test_hung_backlog_bounded(run_dir: Path, no_start: list[Any]) -> None:
    """A listener that never even accepts."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / "control.sock"))
    listener.listen(1)
    try:
        results = [timed(hooks.allocation_created, f"b{i}") for i in range(3)]
    finally:
        listener.close()
    for result, took in results:
        assert took < BOUND_S and result.action == "failed"


@pytest.mark.usefixtures("enabled")
def test_absent_agent_that_cannot_start(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_start: list[Any]
) -> None:
    from gputel.control import launch as agent_launch

    def refuse(settings: Any, wait_s: float = 1.5) -> str:
        raise agent_launch.AgentStartError("nothing to start here")

    monkeypatch.setattr(agent_launch, "ensure_agent", refuse)
    result, took = timed(hooks.allocation_created, "a", gpus=[0])
    assert took < BOUND_S
    assert result.action == "failed" and "nothing to start here" in result.detail
    assert no_start == []


@pytest.mark.usefixtures("enabled")
def test_absent_agent_slow_start_goes_pending(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, no_start: list[Any]
) -> None:
    from gputel.control import launch as agent_launch

    def slow(settings: Any, wait_s: float = 1.5) -> str:
        time.sleep(5)
        return "never"

    monkeypatch.setattr(agent_launch, "ensure_agent", slow)
    result, took = timed(hooks.allocation_created, "slow", gpus=[1], pid=os.getpid())
    assert took < BOUND_S
    assert result.ok and result.action == "pending", result
    assert no_start == [("slow", [1], os.getpid())]


@pytest.mark.usefixtures("enabled")
def test_absent_agent_started_in_budget(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_start: list[Any]
) -> None:
    from gputel.control import launch as agent_launch

    fake = ServedAgent(run_dir, tmp_path / "log")
    monkeypatch.setattr(
        agent_launch, "ensure_agent", lambda settings, wait_s=1.5: fake.start() or "test"
    )
    try:
        result, took = timed(hooks.allocation_created, "late", gpus=[0])
    finally:
        fake.stop()
    assert took < BOUND_S
    assert result.action == "registered" and "agent started: test" in result.detail
    assert [a["id"] for a in fake.store.list()] == ["late"]


@pytest.mark.usefixtures("enabled")
def test_absent_agent_started_after_budget(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_start: list[Any]
) -> None:
    from gputel.control import launch as agent_launch

    monkeypatch.setattr(agent_launch, "ensure_agent", lambda settings, wait_s=1.5: "starting")
    result, took = timed(hooks.allocation_created, "p", gpus=None)
    assert took < BOUND_S
    assert result.action == "pending" and "starting" in result.detail
    assert no_start == [("p", None, None)]


@pytest.mark.usefixtures("enabled")
def test_stuck_client_bounded(monkeypatch: pytest.MonkeyPatch, run_dir: Path) -> None:
    """Even a client call that blocks forever cannot hold the caller past the deadline."""
    import gputel.control.client

    monkeypatch.setattr(gputel.control.client, "request", lambda *a, **k: time.sleep(30))
    for call in (lambda: hooks.allocation_created("s"), lambda: hooks.allocation_released("s")):
        result, took = timed(call)
        assert took < BOUND_S and result.action == "failed"


@pytest.mark.usefixtures("enabled")
def test_permission_denied_bounded(
    monkeypatch: pytest.MonkeyPatch, run_dir: Path, no_start: list[Any]
) -> None:
    import gputel.control.client

    def denied(*a: Any, **k: Any) -> None:
        raise AgentUnavailable("permission denied on x", "permission")

    monkeypatch.setattr(gputel.control.client, "request", denied)
    for call in (lambda: hooks.allocation_created("d"), lambda: hooks.allocation_released("d")):
        result, took = timed(call)
        assert took < BOUND_S and result.action == "failed"
        assert "permission denied" in result.detail
    assert no_start == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another user")
def test_permission_denied_for_real(tmp_path: Path, agent: ServedAgent) -> None:
    """An unprivileged caller facing a root-only run directory (a real EACCES)."""
    os.chmod(tmp_path, 0o755)
    os.chmod(agent.run_dir, 0o700)
    script = textwrap.dedent(
        """
        import json, os, sys, time
        from gputel import hooks
        from gputel.control import launch as agent_launch
        from gputel.control import client as control
        os.setgid(65534); os.setuid(65534)
        t0 = time.monotonic()
        r = hooks.allocation_created("job-x", gpus=[0])
        t1 = time.monotonic()
        q = hooks.allocation_released("job-x")
        t2 = time.monotonic()
        print(json.dumps([r.action, r.detail, t1 - t0, q.action, q.detail, t2 - t1]))
        """
    )
    env = dict(os.environ, GPU_TELEMETRY_AUTOSTART="yes", HOME="/")
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    if out.returncode != 0 and ("Permission denied" in out.stderr or "NotFound" in out.stderr):
        pytest.skip(f"Python is not usable by nobody here: {out.stderr.strip()[-200:]}")
    assert out.returncode == 0, out.stderr
    action, detail, took, raction, rdetail, rtook = json.loads(out.stdout)
    assert took < BOUND_S and rtook < BOUND_S
    assert action == "failed" and raction == "failed", (detail, rdetail)
    assert agent.store.list() == []


# ---------------------------------------------------------------------------------- release
@pytest.mark.usefixtures("enabled")
def test_release_without_agent(run_dir: Path) -> None:
    result = hooks.allocation_released("gone")
    assert result.ok and result.action == "not-open"
    AllocationStore(run_dir, run_dir.parent / "log", [0]).allocate("kept", None, None, {})
    result = hooks.allocation_released("kept")
    assert not result.ok and "gputel hook release kept" in result.detail


@pytest.mark.usefixtures("enabled")
def test_release_cancels_pending_registration(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        hooks, "_helper_command", lambda *a: [sys.executable, "-c", "import time; time.sleep(30)"]
    )
    assert hooks._start_helper("short", None, None) is None
    proc = hooks._helpers["short"]
    result, took = timed(hooks.allocation_released, "short")
    assert took < BOUND_S
    assert result.ok and result.action == "not-open" and "never registered" in result.detail
    assert proc.wait(timeout=5) is not None


def test_helper_command_round_trips() -> None:
    cmd = hooks._helper_command("job-1", [0, 2], 123)
    assert cmd[:5] == [sys.executable, "-m", "gputel", "hook", "allocate"]
    assert cmd[5:] == ["job-1", "--gpus", "0,2", "--pid", "123", "--wait", "30", "--quiet"]


def test_helper_command_registers(agent: ServedAgent) -> None:
    """The detached helper's command line is a working CLI call."""
    cmd = hooks._helper_command("from-helper", [1], os.getpid())
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    (alloc,) = agent.store.list()
    assert (alloc["id"], alloc["gpus"], alloc["pid"]) == ("from-helper", [1], os.getpid())


# ---------------------------------------------------------------------------------- many callers
@pytest.mark.usefixtures("enabled")
def test_many_threads(agent: ServedAgent) -> None:
    results: list[hooks.HookResult] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        r = hooks.allocation_created(f"th-{n}", gpus=[n % 2])
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.action == "registered" for r in results), results
    assert sorted(a["id"] for a in agent.store.list()) == sorted(f"th-{n}" for n in range(16))


CLIENT = """
import sys
from gputel import hooks
worker, pairs = int(sys.argv[1]), int(sys.argv[2])
bad = []
for i in range(pairs):
    ident = f"w{worker}-{i}"
    a = hooks.allocation_created(ident, gpus=[i % 2])
    r = hooks.allocation_released(ident)
    if a.action != "registered" or r.action != "released":
        bad.append((ident, a, r))
keep = hooks.allocation_created(f"keep-{worker}")
if keep.action != "registered":
    bad.append(("keep", keep))
print(bad)
sys.exit(1 if bad else 0)
"""


def run_clients(env: dict[str, str] | None, workers: int, pairs: int) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(w), str(pairs)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for w in range(workers)
    ]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, outs


def check_consistent(run_dir: Path, log_dir: Path, workers: int, pairs: int) -> None:
    expected_open = {f"keep-{w}" for w in range(workers)}
    listed = request(run_dir, {"op": "list"})["allocations"]
    assert {a["id"] for a in listed} == expected_open
    on_disk = json.loads((run_dir / "allocations.json").read_text())
    assert {a["id"] for a in on_disk["allocations"]} == expected_open
    lines = (log_dir / "allocations.csv").read_text().splitlines()
    assert lines[0].startswith("id,gpus,")
    ids = [line.split(",", 1)[0] for line in lines[1:]]
    assert sorted(ids) == sorted(f"w{w}-{i}" for w in range(workers) for i in range(pairs))


@pytest.mark.usefixtures("enabled")
def test_fifty_pairs_from_several_processes(agent: ServedAgent, tmp_path: Path) -> None:
    run_clients(None, 5, 10)
    check_consistent(agent.run_dir, tmp_path / "log", 5, 10)
    assert {a["id"] for a in agent.store.list()} == {f"keep-{w}" for w in range(5)}


def test_fifty_pairs_against_the_real_agent(tmp_path: Path) -> None:
    with running_agent(tmp_path) as run:
        run_clients(env_for(tmp_path, GPU_TELEMETRY_AUTOSTART="on"), 5, 10)
        check_consistent(run, tmp_path / "log", 5, 10)


def test_absent_agent_really_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No agent: the hook starts a detached local one and the allocation gets registered."""
    for key, value in env_for(tmp_path, GPU_TELEMETRY_AUTOSTART="true").items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "run"
    try:
        result, took = timed(hooks.allocation_created, "cold-start", gpus=[0])
        assert took < BOUND_S
        assert result.ok and result.action in ("registered", "pending"), result
        deadline = time.monotonic() + 20
        listed: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                listed = request(run, {"op": "list"})["allocations"]
                if listed:
                    break
            time.sleep(0.1)
        assert [a["id"] for a in listed] == ["cold-start"]
        released, took = timed(hooks.allocation_released, "cold-start")
        assert took < BOUND_S and released.action == "released", released
        assert released.summary is not None and released.summary["gpus"] == [0]
    finally:
        stop_agent(run)
