"""The telemetry child (``gputel record --child``): start, stop, health-check, restart.

Everything here is non-blocking and driven by :meth:`ChildSupervisor.poll` from the agent's loop
with an injected clock, so the loop never waits on a child (its watchdog pings and control socket
keep going) and the unit tests run the whole lifecycle without sleeping. Only
:meth:`ChildSupervisor.shutdown`, used when the agent itself exits, waits.

- stop: SIGTERM, then SIGKILL once ``stop_timeout_s`` has passed;
- crash (an exit nobody asked for while telemetry is wanted): restart after the delays of
  :class:`RestartPolicy` (1 s, 1 s, 2 s, 4 s, 8 s, then 10 s), starting over once a child ran
  ``healthy_after_s`` (10 s). A child that crashes every half minute thus records about 97 % of
  the time instead of waiting longer after each crash; the seconds lost between a crash and the
  next start are counted (``gputel_agent_child_restart_seconds_total``);
- hang (``recorder.json`` heartbeat older than ``max(10 s, 5 × interval)`` once the start grace
  has passed): SIGKILL, then restart like a crash. A recorder stuck in a GPU call cannot be
  trusted to handle SIGTERM, and its records are already missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gputel import lineage, runtime
from gputel.settings import Settings
from gputel.supervisor.notify import NOTIFY_ENV_VARS

log = logging.getLogger(__name__)


class ProcessHandle(Protocol):
    pid: int

    def poll(self) -> int | None: ...

    def send_signal(self, sig: int) -> None: ...


Spawn = Callable[[list[str], dict[str, str]], ProcessHandle]


def child_command() -> list[str]:
    return [sys.executable, "-m", "gputel", "record", "--child"]


def child_env(
    settings: Settings, sim_epoch: float | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The child's environment: ours, the agent's settings, the sim epoch, no systemd notify."""
    env = dict(os.environ if base is None else base)
    for name in NOTIFY_ENV_VARS:
        env.pop(name, None)
    env.update(settings.to_env())
    env["GPUTEL_RUN_DIR"] = str(settings.run_dir)
    # The child's agent, by name: the child stops when it is gone (gputel.lineage).
    env[lineage.AGENT_ENV] = lineage.own_identity().as_env()
    if sim_epoch is not None:
        env[runtime.SIM_EPOCH_ENV] = repr(sim_epoch)
    else:
        env.pop(runtime.SIM_EPOCH_ENV, None)
    return env


def popen_spawn(argv: list[str], env: dict[str, str]) -> ProcessHandle:
    """Start the child with our stdout/stderr (the journal), in its own process group.

    Its own group keeps a terminal's Ctrl-C to the agent alone, which then stops the child in
    order instead of both racing to exit.
    """
    return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def read_heartbeat(run_dir: Path) -> dict[str, Any] | None:
    data = runtime.read_json(run_dir / runtime.RECORDER_STATE_FILE)
    return data if isinstance(data, dict) else None


#: Delays before restarting a crashed or hung child, in crash order; later crashes wait the cap.
RESTART_DELAYS_S: tuple[float, ...] = (1.0, 1.0, 2.0, 4.0, 8.0)
#: The longest wait after a crash: a child that keeps crashing still records most of the time.
RESTART_CAP_S = 10.0
#: A child that ran this long was healthy: the next crash starts the delays over.
HEALTHY_AFTER_S = 10.0


class RestartPolicy:
    """When to restart a child that crashed, and how much recording time restarts cost.

    Pure: every method takes the time (the agent's monotonic clock) as an argument, so the
    delays are unit-tested without a child or a sleep. The delay grows with consecutive crashes
    so that a child failing at start-up does not spin, but stays short: a crash costs seconds
    of telemetry, never a minute.
    """

    def __init__(
        self,
        delays_s: tuple[float, ...] = RESTART_DELAYS_S,
        cap_s: float = RESTART_CAP_S,
        healthy_after_s: float = HEALTHY_AFTER_S,
    ) -> None:
        self.delays_s = tuple(min(d, cap_s) for d in delays_s)
        self.cap_s = cap_s
        self.healthy_after_s = healthy_after_s
        self.consecutive = 0
        """Crashes since the last healthy run."""
        self.lost_s = 0.0
        """Closed intervals between a crash and the next start (or the end of wanting one)."""
        self._started_at: float | None = None
        self._down_since: float | None = None

    def started(self, now: float) -> None:
        """A child was started: the interval since the crash (if any) is lost time."""
        self._close_down(now)
        self._started_at = now

    def crashed(self, now: float) -> float:
        """A child crashed or hung (or could not be started): the delay before the next start."""
        if self._started_at is not None and now - self._started_at >= self.healthy_after_s:
            self.consecutive = 0
        self._started_at = None
        if self._down_since is None:
            self._down_since = now
        n = self.consecutive
        self.consecutive += 1
        return self.delays_s[n] if n < len(self.delays_s) else self.cap_s

    def not_wanted(self, now: float) -> None:
        """Telemetry is no longer wanted: a pending restart costs nothing from here on."""
        self._close_down(now)
        self._started_at = None
        self.consecutive = 0

    def lost_seconds(self, now: float) -> float:
        """Seconds of wanted telemetry lost to restarts so far, the current wait included."""
        pending = now - self._down_since if self._down_since is not None else 0.0
        return self.lost_s + max(0.0, pending)

    def _close_down(self, now: float) -> None:
        if self._down_since is not None:
            self.lost_s += max(0.0, now - self._down_since)
            self._down_since = None


@dataclass
class ChildEvent:
    """Something the agent logs and counts: ``started``, ``stopped``, ``crash``, ``hung``."""

    kind: str
    pid: int | None
    detail: str


class ChildSupervisor:
    """Keeps exactly one recorder running while ``wanted``, none otherwise."""

    def __init__(
        self,
        settings: Settings,
        *,
        sim_epoch: float | None = None,
        spawn: Spawn = popen_spawn,
        clock: Callable[[], float] = time.monotonic,
        heartbeat: Callable[[], dict[str, Any] | None] | None = None,
        stop_timeout_s: float = 5.0,
        restart_policy: RestartPolicy | None = None,
        start_grace_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.sim_epoch = sim_epoch
        self._spawn = spawn
        self._clock = clock
        run_dir = settings.run_dir
        self._heartbeat = heartbeat or (lambda: read_heartbeat(run_dir))
        self.stop_timeout_s = stop_timeout_s
        self.policy = restart_policy or RestartPolicy()
        self.hung_after_s = max(10.0, 5 * settings.interval_s)
        self.start_grace_s = (
            start_grace_s if start_grace_s is not None else self.hung_after_s + 10.0
        )

        self.wanted = False
        self.proc: ProcessHandle | None = None
        self.started_at: float | None = None
        self.restarts: dict[str, int] = {"crash": 0, "hung": 0}
        self._stopping_since: float | None = None
        self._killed = False
        self._hung_kill = False
        self._next_start_at: float | None = None
        self._last_delay = 0.0
        self.last_heartbeat: dict[str, Any] | None = None

    # ------------------------------------------------------------------ queries
    @property
    def running(self) -> bool:
        """A child process exists and has not been asked to go (it may still be starting)."""
        return self.proc is not None and self._stopping_since is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def restarts_total(self) -> int:
        return sum(self.restarts.values())

    def uptime_s(self, now: float | None = None) -> float | None:
        if self.proc is None or self.started_at is None:
            return None
        return max(0.0, (self._clock() if now is None else now) - self.started_at)

    def restart_seconds(self, now: float | None = None) -> float:
        """Seconds telemetry was wanted but no child ran because one crashed or hung."""
        return self.policy.lost_seconds(self._clock() if now is None else now)

    def fresh_heartbeat(self) -> dict[str, Any] | None:
        """The current child's last heartbeat, or None (missing, unreadable, another pid's)."""
        hb = self.last_heartbeat
        if hb is None or self.proc is None or hb.get("pid") != self.proc.pid:
            return None
        return hb

    # ------------------------------------------------------------------ control
    def set_wanted(self, wanted: bool) -> list[ChildEvent]:
        """Ask for a child or for none; acts at once (start or SIGTERM), then via :meth:`poll`."""
        if wanted == self.wanted:
            return []
        self.wanted = wanted
        now = self._clock()
        if wanted:
            self._next_start_at = now
        else:
            self._next_start_at = None
            self.policy.not_wanted(now)
        return self.poll(now)

    def poll(self, now: float | None = None) -> list[ChildEvent]:
        """One look at the child: reap, escalate a stop, detect crash or hang, (re)start."""
        now = self._clock() if now is None else now
        events: list[ChildEvent] = []
        if self.proc is not None:
            code = self._safe_poll()
            if code is not None:
                events.append(self._on_exit(code, now))
            elif self._stopping_since is not None:
                self._escalate(now)
            elif not self.wanted:
                self._terminate(now)
            else:
                ev = self._check_hung(now)
                if ev is not None:
                    events.append(ev)
        if (
            self.proc is None
            and self.wanted
            and self._next_start_at is not None
            and now >= self._next_start_at
        ):
            ev = self._start(now)
            if ev is not None:
                events.append(ev)
        return events

    def forward_signal(self, sig: int) -> bool:
        """Pass ``sig`` (SIGHUP from logrotate) to a child that is up and running.

        A child without a heartbeat yet may not have installed its handlers, and SIGHUP's default
        action would kill it; it is opening fresh files anyway, so the signal is not needed.
        """
        # One look at the child: the agent's loop may replace it meanwhile (a release asks from
        # the control thread).
        proc = self.proc
        if proc is None or self._stopping_since is not None:
            return False
        hb = self.last_heartbeat
        if hb is None or hb.get("pid") != proc.pid:
            hb = self._heartbeat()
            if hb is None or hb.get("pid") != proc.pid:
                return False
            self.last_heartbeat = hb
        try:
            proc.send_signal(sig)
            return True
        except (ProcessLookupError, OSError):
            return False

    def shutdown(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Stop the child and wait for it (the agent is exiting): SIGTERM, SIGKILL, reaped."""
        self.wanted = False
        self._next_start_at = None
        if self.proc is None:
            return
        self._terminate(self._clock())
        deadline = self._clock() + self.stop_timeout_s + 2.0
        while self.proc is not None and self._clock() < deadline:
            self.poll()
            if self.proc is not None:
                sleep(0.02)

    # ------------------------------------------------------------------ internals
    def _safe_poll(self) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.poll()
        except OSError:
            return -1

    def _start(self, now: float) -> ChildEvent | None:
        try:
            self.proc = self._spawn(child_command(), child_env(self.settings, self.sim_epoch))
        except OSError as exc:
            self._schedule_restart(now)
            log.error("cannot start the telemetry child: %s", exc)
            return ChildEvent("spawn_failed", None, str(exc))
        self.started_at = now
        self.policy.started(now)
        self._stopping_since = None
        self._killed = False
        self._hung_kill = False
        self.last_heartbeat = None
        self._next_start_at = None
        return ChildEvent("started", self.proc.pid, "")

    def _terminate(self, now: float) -> None:
        assert self.proc is not None
        self._stopping_since = now
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.send_signal(signal.SIGTERM)

    def _escalate(self, now: float) -> None:
        assert self.proc is not None and self._stopping_since is not None
        if not self._killed and now - self._stopping_since >= self.stop_timeout_s:
            self._kill()
            log.warning(
                "telemetry child %d ignored SIGTERM for %gs; sent SIGKILL",
                self.proc.pid,
                self.stop_timeout_s,
            )

    def _kill(self) -> None:
        assert self.proc is not None
        self._killed = True
        with contextlib.suppress(ProcessLookupError, OSError):
            self.proc.send_signal(signal.SIGKILL)

    def _on_exit(self, code: int, now: float) -> ChildEvent:
        assert self.proc is not None
        pid = self.proc.pid
        asked = self._stopping_since is not None
        hung = self._hung_kill
        self.proc = None
        self.started_at = None
        self._stopping_since = None
        self._killed = False
        self._hung_kill = False
        self.last_heartbeat = None
        if hung:
            self._schedule_restart(now)
            return ChildEvent("hung_exited", pid, f"exit code {code}")
        if asked or not self.wanted:
            if self.wanted:
                self._next_start_at = now
            return ChildEvent("stopped", pid, f"exit code {code}")
        self.restarts["crash"] += 1
        self._schedule_restart(now)
        return ChildEvent("crash", pid, f"exit code {code}; restarting in {self._last_delay:g}s")

    def _schedule_restart(self, now: float) -> None:
        if not self.wanted:
            self._next_start_at = None
            return
        self._last_delay = self.policy.crashed(now)
        self._next_start_at = now + self._last_delay

    def _check_hung(self, now: float) -> ChildEvent | None:
        assert self.proc is not None and self.started_at is not None
        hb = self._heartbeat()
        if hb is not None and hb.get("pid") == self.proc.pid:
            self.last_heartbeat = hb
        fresh = self.fresh_heartbeat()
        age: float | None = None
        if fresh is not None:
            mono = fresh.get("monotonic")
            if isinstance(mono, (int, float)):
                age = now - float(mono)
        if age is None:
            if now - self.started_at < self.start_grace_s:
                return None
            reason = f"no heartbeat {self.start_grace_s:g}s after start"
        elif age <= self.hung_after_s or now - self.started_at < self.start_grace_s:
            return None
        else:
            reason = f"heartbeat {age:.1f}s old (limit {self.hung_after_s:g}s)"
        self.restarts["hung"] += 1
        self._hung_kill = True
        self._stopping_since = now
        self._kill()
        return ChildEvent("hung", self.proc.pid, reason + "; killed")
