"""The recorder child's lifecycle on a fake clock with fake processes: no sleeps, no children."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from gputel import runtime
from gputel.settings import Settings
from gputel.supervisor.child import (
    HEALTHY_AFTER_S,
    RESTART_CAP_S,
    ChildSupervisor,
    RestartPolicy,
    child_command,
    child_env,
)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []
        self.ignore_term = False

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignore_term):
            self.returncode = -sig if sig == signal.SIGKILL else 0


class Spawner:
    def __init__(self) -> None:
        self.procs: list[FakeProc] = []
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.fail = False

    def __call__(self, argv: list[str], env: dict[str, str]) -> FakeProc:
        if self.fail:
            raise OSError("no such file")
        self.calls.append((argv, env))
        p = FakeProc(100 + len(self.procs))
        self.procs.append(p)
        return p

    @property
    def last(self) -> FakeProc:
        return self.procs[-1]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(interval_s=1.0, run_dir=tmp_path / "run", log_dir=tmp_path / "log")


def make(
    settings: Settings, heartbeat: dict[str, Any] | None = None, **kw: Any
) -> tuple[ChildSupervisor, Spawner, FakeClock, dict[str, Any]]:
    clock = FakeClock()
    spawner = Spawner()
    hb: dict[str, Any] = {"value": heartbeat}
    sup = ChildSupervisor(settings, spawn=spawner, clock=clock, heartbeat=lambda: hb["value"], **kw)
    return sup, spawner, clock, hb


def test_env_drops_systemd_notify_and_passes_settings_and_epoch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "WATCHDOG_PID": "1", "PATH": "/bin"}
    env = child_env(settings, 123.5, base)
    assert "NOTIFY_SOCKET" not in env and "WATCHDOG_USEC" not in env and "WATCHDOG_PID" not in env
    assert env["PATH"] == "/bin"
    assert env[runtime.SIM_EPOCH_ENV] == "123.5"
    assert env["GPUTEL_RUN_DIR"] == str(settings.run_dir)
    assert env["GPUTEL_INTERVAL"] == "1.0"
    assert child_command()[-2:] == ["record", "--child"]
    assert runtime.SIM_EPOCH_ENV not in child_env(settings, None, {runtime.SIM_EPOCH_ENV: "9"})


def test_start_and_clean_stop(settings: Settings) -> None:
    sup, sp, clock, _ = make(settings)
    ev = sup.set_wanted(True)
    assert [e.kind for e in ev] == ["started"]
    assert sup.running and sup.pid == 100
    clock.advance(3)
    assert sup.uptime_s() == pytest.approx(3)
    ev = sup.set_wanted(False)
    assert sp.last.signals == [signal.SIGTERM]
    ev += sup.poll()
    assert [e.kind for e in ev] == ["stopped"]
    assert sup.proc is None
    clock.advance(100)
    assert sup.poll() == [] and len(sp.procs) == 1
    assert sup.restarts_total == 0


def test_stop_escalates_to_sigkill_after_timeout(settings: Settings) -> None:
    sup, sp, clock, _ = make(settings, stop_timeout_s=5.0)
    sup.set_wanted(True)
    sp.last.ignore_term = True
    sup.set_wanted(False)
    clock.advance(4.9)
    assert sup.poll() == [] and sp.last.signals == [signal.SIGTERM]
    clock.advance(0.2)
    sup.poll()
    assert sp.last.signals == [signal.SIGTERM, signal.SIGKILL]
    assert [e.kind for e in sup.poll()] == ["stopped"]
    assert sup.restarts_total == 0


def test_policy_delays_are_short_capped_and_start_over_after_a_healthy_run() -> None:
    policy = RestartPolicy()
    t = 0.0
    delays = []
    for _ in range(8):
        policy.started(t)
        t += 3.0  # crashes 3 s after each start
        delays.append(policy.crashed(t))
        t += delays[-1]
    assert delays == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert all(d <= 2.0 for d in delays[:3]) and max(delays) <= RESTART_CAP_S
    assert policy.lost_seconds(t) == sum(delays)
    # A run of HEALTHY_AFTER_S: the next crash is back after the first delay again.
    policy.started(t)
    t += HEALTHY_AFTER_S
    assert policy.crashed(t) == 1.0
    assert policy.crashed(t + 1.0) == 1.0  # a failed start counts as a crash too
    assert policy.crashed(t + 2.0) == 2.0


def test_policy_a_child_crashing_every_30s_records_most_of_the_time() -> None:
    policy = RestartPolicy()
    t = 0.0
    for _ in range(20):
        policy.started(t)
        t += 30.0
        t += policy.crashed(t)
    assert policy.lost_seconds(t) / t < 0.05


def test_policy_counts_lost_time_until_telemetry_is_no_longer_wanted() -> None:
    policy = RestartPolicy()
    policy.started(0.0)
    assert policy.crashed(5.0) == 1.0
    assert policy.lost_seconds(5.5) == 0.5  # the current wait counts while it lasts
    policy.not_wanted(5.25)
    assert policy.lost_seconds(100.0) == 0.25
    assert policy.consecutive == 0


def test_crash_restarts_after_the_policy_delays_and_counts_lost_time(settings: Settings) -> None:
    sup, sp, clock, hb = make(settings)
    sup.set_wanted(True)
    delays = []
    for _ in range(7):
        clock.advance(2.0)
        sp.last.returncode = 1
        ev = sup.poll()
        assert [e.kind for e in ev] == ["crash"]
        waited = 0.0
        while sup.proc is None:
            clock.advance(0.5)
            waited += 0.5
            sup.poll()
        delays.append(waited)
    assert delays == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert sup.restarts == {"crash": 7, "hung": 0}
    assert sup.restart_seconds() == sum(delays)
    # Up long enough (with a fresh heartbeat): the delays start over.
    for _ in range(int(HEALTHY_AFTER_S) + 1):
        clock.advance(1)
        hb["value"] = {"pid": sup.pid, "monotonic": clock()}
        assert sup.poll() == []
    sp.last.returncode = 1
    sup.poll()
    clock.advance(1.0)
    assert [e.kind for e in sup.poll()] == ["started"]
    assert sup.restart_seconds() == sum(delays) + 1.0


def test_exit_while_not_wanted_is_not_a_crash(settings: Settings) -> None:
    sup, sp, _clock, _ = make(settings)
    sup.set_wanted(True)
    sp.last.ignore_term = True
    sup.set_wanted(False)
    sp.last.returncode = 0
    assert [e.kind for e in sup.poll()] == ["stopped"]
    assert sup.restarts_total == 0


def test_hung_child_is_killed_and_restarted(settings: Settings) -> None:
    sup, sp, clock, hb = make(settings, start_grace_s=15.0)
    assert sup.hung_after_s == 10.0
    sup.set_wanted(True)
    first = sp.last
    for _ in range(20):
        clock.advance(1)
        hb["value"] = {"pid": first.pid, "monotonic": clock()}
        assert sup.poll() == []
    # The heartbeat stops moving.
    frozen = clock()
    for _ in range(10):
        clock.advance(1)
        assert sup.poll() == []
    hb["value"] = {"pid": first.pid, "monotonic": frozen}
    clock.advance(1.5)
    ev = sup.poll()
    assert [e.kind for e in ev] == ["hung"]
    assert signal.SIGKILL in first.signals
    assert sup.restarts == {"crash": 0, "hung": 1}
    assert [e.kind for e in sup.poll()] == ["hung_exited"]
    clock.advance(1.0)
    assert [e.kind for e in sup.poll()] == ["started"]
    assert sp.last is not first


def test_no_heartbeat_after_grace_is_hung_and_other_pids_do_not_count(settings: Settings) -> None:
    sup, _sp, clock, hb = make(settings, start_grace_s=15.0)
    sup.set_wanted(True)
    for _ in range(14):
        clock.advance(1)
        hb["value"] = {"pid": 99999, "monotonic": clock()}  # a previous child's file
        assert sup.poll() == []
    clock.advance(1.1)
    ev = sup.poll()
    assert [e.kind for e in ev] == ["hung"]
    assert "no heartbeat" in ev[0].detail


def test_spawn_failure_retries_with_backoff(settings: Settings) -> None:
    sup, sp, clock, _ = make(settings)
    sp.fail = True
    ev = sup.set_wanted(True)
    assert [e.kind for e in ev] == ["spawn_failed"]
    sp.fail = False
    clock.advance(0.5)
    assert sup.poll() == []
    clock.advance(0.5)
    assert [e.kind for e in sup.poll()] == ["started"]


def test_forward_sighup_and_shutdown(settings: Settings) -> None:
    sup, sp, clock, hb = make(settings, stop_timeout_s=2.0)
    assert not sup.forward_signal(signal.SIGHUP)
    sup.set_wanted(True)
    # Not before its first heartbeat: SIGHUP's default action would kill a starting child.
    assert not sup.forward_signal(signal.SIGHUP)
    hb["value"] = {"pid": sup.pid, "monotonic": clock()}
    assert sup.forward_signal(signal.SIGHUP)
    assert sp.last.signals == [signal.SIGHUP]
    sp.last.ignore_term = True
    sup.shutdown(sleep=clock.advance)
    assert sup.proc is None
    assert sp.last.signals == [signal.SIGHUP, signal.SIGTERM, signal.SIGKILL]
    assert not sup.wanted


def test_rewanted_while_stopping_starts_after_exit(settings: Settings) -> None:
    sup, sp, _clock, _ = make(settings)
    sup.set_wanted(True)
    sp.last.ignore_term = True
    sup.set_wanted(False)
    sup.set_wanted(True)
    assert len(sp.procs) == 1
    sp.last.returncode = 0
    ev = sup.poll()
    assert [e.kind for e in ev] == ["stopped", "started"]
    assert len(sp.procs) == 2 and sup.restarts_total == 0
