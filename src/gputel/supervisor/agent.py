"""``gputel agent``: the supervisor daemon.

One loop thread owns all decisions: each tick it reads GPU utilization, steps the pure state
machine, applies the operator mode and the open allocations, and starts or stops the telemetry
child. Other threads only ask: the control socket (status, mode, allocations) and the HTTP
exporter read a snapshot under a lock and wake the loop when something changed.

Every GPU call goes through :class:`GpuCaller`, one dedicated thread with a deadline per call,
because an NVML call can block forever (a GPU off the bus, a wedged driver) and cannot be
cancelled. A read that misses its deadline marks the agent degraded; the loop keeps turning,
keeps pinging the systemd watchdog and keeps answering ``gputel status``, and no second read is
queued behind the stuck one.
"""

from __future__ import annotations

import builtins
import collections
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from gputel import __version__, runtime
from gputel.formats import iso_utc_ms
from gputel.settings import Settings
from gputel.supervisor.agent_metrics import (
    AgentSnapshot,
    join_exposition,
    read_fresh_metrics,
    render_agent,
)
from gputel.supervisor.child import ChildEvent, ChildSupervisor, Spawn, popen_spawn
from gputel.supervisor.notify import Notifier
from gputel.supervisor.states import (
    ActivityState,
    Machine,
    Mode,
    Thresholds,
    step,
    telemetry_wanted,
)
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog
from gputel.ticker import Ticker, Waker

log = logging.getLogger("gputel.supervisor.agent")

RECENT_TRANSITIONS = 10
ENERGY_DEADLINE_S = 0.5
#: The exporter thread wakes this often when nobody scrapes; each wake-up costs CPU on an idle node.
HTTP_POLL_S = 5.0


class AgentError(RuntimeError):
    """The agent cannot start; ``str()`` is one line saying why and what to do."""


class AgentConfigError(AgentError):
    """A setting names something this node does not have (e.g. a GPU index): exit 2, no restart."""


class AgentAlreadyRunning(AgentError):
    """Another agent holds this run directory's lock."""


class AllocationStoreLike(Protocol):
    def allocate(
        self,
        id: str,
        gpus: list[int] | None,
        pid: int | None,
        energy_j: Mapping[int, float | None] | None,
    ) -> dict[str, Any]: ...

    def release(self, id: str, energy_j: Mapping[int, float | None] | None) -> dict[str, Any]: ...

    def list(self) -> builtins.list[dict[str, Any]]: ...

    def open_count(self) -> int: ...

    def reap_dead_owners(
        self, energy_j: Mapping[int, float | None] | None
    ) -> builtins.list[dict[str, Any]]: ...


# ---------------------------------------------------------------------------------- GPU calls
class _Job:
    __slots__ = ("done", "error", "fn", "started_at", "value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.started_at: float | None = None


class GpuCaller:
    """Runs GPU calls one at a time on a daemon thread; callers wait with a deadline.

    A call still running after its caller's deadline is *stuck*: further calls are refused at
    once (they would only queue behind it) until it returns.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._queue: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stuck: _Job | None = None
        self._thread = threading.Thread(target=self._work, name="gputel-gpu", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            job.started_at = self._clock()
            try:
                job.value = job.fn()
            except BaseException as exc:
                job.error = exc
            with self._lock:
                if self._stuck is job:
                    self._stuck = None
            job.done.set()

    @property
    def stuck_for(self) -> float | None:
        """Seconds the stuck call has been running, or None when no call is stuck."""
        with self._lock:
            job = self._stuck
        if job is None or job.started_at is None:
            return None
        return max(0.0, self._clock() - job.started_at)

    def submit(self, fn: Callable[[], Any]) -> _Job | None:
        with self._lock:
            if self._stuck is not None:
                return None
        job = _Job(fn)
        self._queue.put(job)
        return job

    def wait(self, job: _Job, timeout: float) -> bool:
        if job.done.wait(timeout):
            return True
        with self._lock:
            if not job.done.is_set():
                self._stuck = job
        return job.done.is_set()

    def call(self, fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
        """``("ok", value)``, ``("error", exc)``, ``("timeout", None)`` or ``("stuck", None)``."""
        job = self.submit(fn)
        if job is None:
            return "stuck", None
        if not self.wait(job, timeout):
            return "timeout", None
        if job.error is not None:
            return "error", job.error
        return "ok", job.value


class LazyEnergy(Mapping[int, "float | None"]):
    """Energy per GPU, read (with a deadline) only if someone looks: reaping usually finds no
    dead owner, and then no GPU call is made at all."""

    def __init__(self, read: Callable[[], dict[int, float | None]]) -> None:
        self._read = read
        self._data: dict[int, float | None] | None = None

    def _load(self) -> dict[int, float | None]:
        if self._data is None:
            self._data = self._read()
        return self._data

    def __getitem__(self, key: int) -> float | None:
        return self._load()[key]

    def __iter__(self) -> Iterator[int]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


# ---------------------------------------------------------------------------------- the agent
@dataclass
class _ModeState:
    mode: Mode = Mode.AUTO
    until_mono: float | None = None
    until_iso: str | None = None
    set_for_s: float | None = None


def _take_lock(run_dir: Path) -> int:
    try:
        return runtime.take_agent_lock(run_dir)
    except runtime.LockHeld as exc:
        raise AgentAlreadyRunning(str(exc)) from None
    except runtime.RunDirError as exc:
        raise AgentError(str(exc)) from None


def _default_store(settings: Settings, known_gpus: list[int]) -> AllocationStoreLike:
    from gputel.control.allocations import AllocationStore

    return AllocationStore(settings.run_dir, settings.log_dir, known_gpus)


class Agent:
    """The supervisor. ``run()`` blocks until SIGTERM/SIGINT or :meth:`request_stop`."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        *,
        env: Mapping[str, str] | None = None,
        spawn: Spawn = popen_spawn,
        store_factory: Callable[[Settings, list[int]], AllocationStoreLike] = _default_store,
        install_signals: bool = True,
        source_open_timeout_s: float = 30.0,
        source: Any = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._env = dict(os.environ if env is None else env)
        self._spawn = spawn
        self._store_factory = store_factory
        self._install_signals = install_signals
        self._source_open_timeout_s = source_open_timeout_s
        self.thresholds = Thresholds.of(settings)
        self.read_deadline_s = max(0.5, min(settings.interval_s, 5.0))
        self.loop_stale_after_s = max(10.0, 3 * settings.interval_s)

        self._lock = threading.RLock()
        self._stop = False
        self._hup = False
        self._waker: Waker | None = None
        self._lock_fd: int | None = None
        self._ready_sent = False
        self._status_key: tuple[Any, ...] | None = None
        self._progress = 0
        self._last_loop_at = clock()
        self.start_wall = time.time()

        self.machine = Machine(ActivityState.IDLE, clock())
        self.mode = _ModeState()
        self.wanted = False
        self.wanted_reason = "not started"
        self.recent: collections.deque[TransitionRecord] = collections.deque(
            maxlen=RECENT_TRANSITIONS
        )
        self.transition_counts: collections.Counter[str] = collections.Counter()
        self.utilization: dict[int, float | None] = {}
        self.util_max: float | None = None
        self.poll_duration_s: float | None = None
        self.degraded: str | None = None
        self.notice: str | None = None
        self.backend = settings.backend
        self.devices: list[Any] = []
        self.exporter: str | None = None
        self.sim_epoch: float | None = None

        self.gpu = GpuCaller(clock)
        self.source: Any = None
        self._given_source = source
        self._source_job: _Job | None = None
        self._util_job: _Job | None = None
        self.store: AllocationStoreLike | None = None
        self.child: ChildSupervisor | None = None
        self.transitions = TransitionsLog(settings.log_dir)
        self.notifier = Notifier(self._env, clock)
        wd = self.notifier.watchdog_interval_s
        if wd is not None:
            # The first stuck read blocks the loop for the whole deadline; pings must not lapse.
            self.read_deadline_s = min(self.read_deadline_s, max(0.2, wd / 2))
        self._control: Any = None
        self._http: Any = None

    # ------------------------------------------------------------------ lifecycle
    def run(self) -> int:
        try:
            self._setup()
        except BaseException:
            self._teardown()
            raise
        try:
            self._loop()
        finally:
            self._teardown()
        return 0

    def request_stop(self) -> None:
        self._stop = True
        if self._waker is not None:
            self._waker.wake()

    def _setup(self) -> None:
        s = self.settings
        try:
            runtime.ensure_run_dir(s.run_dir)
        except runtime.RunDirError as exc:
            raise AgentError(str(exc)) from None
        self._lock_fd = _take_lock(s.run_dir)
        try:
            s.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error(
                "cannot create log directory %s: %s; CSV files will not be written until it "
                "exists and is writable",
                s.log_dir,
                exc.strerror or exc,
            )
        self._waker = Waker()
        if self._install_signals:
            self._signals()
        self._open_source()
        known = [d.index for d in self.devices]
        self.store = self._store_factory(s, known)
        self.child = ChildSupervisor(
            s, sim_epoch=self.sim_epoch, spawn=self._spawn, clock=self._clock
        )

        from gputel.control.client import socket_path
        from gputel.control.protocol import ControlSocketInUse
        from gputel.control.server import ControlServer

        self._control = ControlServer(socket_path(s.run_dir), self.handle)
        try:
            self._control.start()
        except ControlSocketInUse as exc:
            self._control = None
            raise AgentAlreadyRunning(str(exc)) from None
        except OSError as exc:
            self._control = None
            raise AgentError(f"cannot create the control socket: {exc}") from None
        if s.exporter_port:
            self._start_http()
        log.info(
            "gputel agent %s running: backend %s, %d GPU(s), interval %gs, run dir %s, "
            "log dir %s, exporter %s",
            __version__,
            self.backend,
            len(self.devices),
            s.interval_s,
            s.run_dir,
            s.log_dir,
            self.exporter or "off",
        )
        self._reconcile(self._clock())
        self.notifier.ready(self.status_line())
        self._ready_sent = True

    def _start_http(self) -> None:
        from gputel.telemetry.metrics_http import MetricsServer

        s = self.settings
        server = MetricsServer(
            s.exporter_addr,
            s.exporter_port,
            self.metrics_bytes,
            self.health,
            poll_interval=HTTP_POLL_S,
            web_config=s.web_config,
        )
        try:
            server.start()
        except OSError as exc:
            log.error(
                "cannot serve /metrics on %s:%d: %s; the agent runs without its exporter "
                "(free the port or set GPUTEL_EXPORTER_PORT)",
                s.exporter_addr,
                s.exporter_port,
                exc.strerror or exc,
            )
            return
        self._http = server
        addr = s.exporter_addr
        host = f"[{addr}]" if ":" in addr else addr
        self.exporter = f"{host}:{server.port}"

    def _signals(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._hup = True
            if self._waker is not None:
                self._waker.wake()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)

    def _open_source(self) -> None:
        from gputel.sources.select import open_gpu_source

        env = self._env
        given = self._given_source
        if given is not None:
            job = self.gpu.submit(lambda: (given, None))
        else:
            job = self.gpu.submit(lambda: open_gpu_source(self.settings, env, self._clock))
        assert job is not None
        if self.gpu.wait(job, self._source_open_timeout_s):
            self._source_opened(job)
        else:
            self._source_job = job
            self.degraded = "GPU source still opening"
            log.error(
                "opening the GPU source (%s) takes more than %gs; running degraded until it "
                "answers",
                self.settings.backend,
                self._source_open_timeout_s,
            )

    def _source_opened(self, job: _Job) -> None:
        from gputel.sources.base import GpuSelectionError, GpuSourceError

        self._source_job = None
        if job.error is not None:
            if isinstance(job.error, GpuSelectionError):
                raise AgentConfigError(str(job.error))
            if isinstance(job.error, GpuSourceError):
                raise AgentError(str(job.error))
            raise AgentError(f"cannot open the GPU source: {type(job.error).__name__}: {job.error}")
        source, notice = job.value
        self.source = source
        self.backend = getattr(source, "name", self.settings.backend)
        self.sim_epoch = getattr(source, "epoch", None) if self.backend == "sim" else None
        if self.child is not None:
            self.child.sim_epoch = self.sim_epoch
        if notice:
            self.notice = notice
            log.warning("%s", notice)
        status, devices = self.gpu.call(source.devices, max(self.read_deadline_s, 5.0))
        self.devices = list(devices) if status == "ok" else []
        if status != "ok":
            log.error("listing GPUs failed (%s); GPU names are unknown", status)
        if self.degraded == "GPU source still opening":
            self.degraded = None

    def _teardown(self) -> None:
        if self._ready_sent:
            self.notifier.stopping()
        if self._control is not None:
            self._control.stop()
            self._control = None
        if self.child is not None:
            with self._lock:
                was = self.child.proc is not None
            self.child.shutdown()
            if was:
                log.info("telemetry child stopped")
        if self._http is not None:
            # stop() waits for the server's next poll (up to HTTP_POLL_S); the process is about
            # to exit, so give it a moment and let a daemon thread finish the job.
            stopper = threading.Thread(target=self._http.stop, name="gputel-http-stop", daemon=True)
            stopper.start()
            stopper.join(0.2)
            self._http = None
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.notifier.close()
        if self._ready_sent:
            log.info("gputel agent stopped")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        ticker = Ticker(self.settings.interval_s, clock=self._clock, wait=self._wait)
        while not self._stop:
            k = ticker.next()
            if self._stop:
                break
            if self._hup:
                self._hup = False
                with self._lock:
                    forwarded = self.child is not None and self.child.forward_signal(signal.SIGHUP)
                log.info(
                    "SIGHUP: %s",
                    "forwarded to the telemetry child"
                    if forwarded
                    else "not forwarded, no telemetry child up (a new one opens new files)",
                )
            now = self._clock()
            if k is None:
                self._reconcile(now)
            else:
                self.tick(now)

    def _wait(self, timeout: float) -> bool:
        """The ticker's sleep, cut into watchdog-sized slices; True when woken early."""
        assert self._waker is not None
        end = self._clock() + timeout
        while True:
            self._progress += 1
            self._last_loop_at = self._clock()
            self.notifier.watchdog(self._progress)
            remaining = end - self._clock()
            if remaining <= 0:
                return False
            nxt = self.notifier.next_ping_in()
            chunk = remaining if nxt is None else min(remaining, max(nxt, 0.01))
            if self._waker.wait(chunk) or self._stop:
                return True

    def tick(self, now: float) -> None:
        """One poll: read, step the machine, then reconcile mode, allocations and the child."""
        util = self._read_utilization()
        now = self._clock()
        with self._lock:
            self.machine, tr = step(self.machine, util, now, self.thresholds)
            if tr is not None:
                self._record(tr.from_state.value, tr.to_state.value, tr.reason)
        self._reap()
        self._reconcile(now)

    def _read_utilization(self) -> float | None:
        if self.source is None:
            job = self._source_job
            if job is not None and job.done.is_set():
                try:
                    self._source_opened(job)
                except AgentError as exc:
                    self._source_job = None
                    self.degraded = f"GPU source failed: {exc}"
                    log.error("%s", self.degraded)
            if self.source is None:
                return None
        if self._util_job is not None:
            if not self._util_job.done.is_set():
                stuck = self.gpu.stuck_for or 0.0
                self.degraded = f"GPU read stuck for {stuck:.0f}s"
                self._forget_utilization()
                return None
            self._util_job = None
            log.warning("the stuck GPU read returned; GPU reads resume")
            self.degraded = None
        t0 = self._clock()
        job = self.gpu.submit(self.source.read_utilization)
        if job is None:
            # Another GPU call (an allocation's energy read) is stuck on the reader thread.
            self.degraded = "GPU read stuck"
            self._forget_utilization()
            return None
        if not self.gpu.wait(job, self.read_deadline_s):
            self._util_job = job
            self.degraded = "GPU read stuck"
            log.error(
                "GPU utilization read did not return within %gs; running degraded (no activity "
                "decisions) until it does",
                self.read_deadline_s,
            )
            self._forget_utilization()
            return None
        self.poll_duration_s = self._clock() - t0
        if job.error is not None:
            if self.degraded is None or not self.degraded.startswith("GPU read failed"):
                log.error("GPU utilization read failed: %s", job.error)
            self.degraded = f"GPU read failed: {type(job.error).__name__}"
            values: dict[int, float | None] = {}
        else:
            if self.degraded is not None and self.degraded.startswith("GPU read"):
                log.info("GPU utilization reads work again")
                self.degraded = None
            values = dict(job.value or {})
        known = [v for v in values.values() if v is not None]
        with self._lock:
            self.utilization = values
            self.util_max = max(known) if known else None
        return self.util_max

    def _forget_utilization(self) -> None:
        """No reading this tick: status and /metrics must not keep showing the last one."""
        with self._lock:
            self.utilization = dict.fromkeys(self.utilization)
            self.util_max = None

    def _energy_now(self) -> dict[int, float | None]:
        if self.source is None:
            return {}
        status, value = self.gpu.call(self.source.read_energy_j, ENERGY_DEADLINE_S)
        if status != "ok" or not isinstance(value, dict):
            return {d.index: None for d in self.devices}
        return value

    def _reap(self) -> None:
        store = self.store
        if store is None or store.open_count() == 0:
            return
        try:
            reaped = store.reap_dead_owners(LazyEnergy(self._energy_now))
        except Exception:
            log.exception("reaping allocations of exited owners failed")
            return
        for summary in reaped:
            log.info("allocation %s released: %s", summary.get("id"), summary.get("release_reason"))

    def _reconcile(self, now: float) -> None:
        """Mode expiry, telemetry decision, child lifecycle, sd_notify STATUS."""
        with self._lock:
            m = self.mode
            if m.until_mono is not None and now >= m.until_mono:
                old = m.mode
                self.mode = _ModeState()
                self._record(
                    f"mode_{old.value}", "mode_auto", f"mode {old.value} for {m.set_for_s:g}s ended"
                )
            n_alloc = self.store.open_count() if self.store is not None else 0
            wanted, reason = telemetry_wanted(self.machine.state, self.mode.mode, n_alloc)
            if wanted != self.wanted:
                self._record(
                    "telemetry_off" if wanted else "telemetry_on",
                    "telemetry_on" if wanted else "telemetry_off",
                    reason,
                )
                self.wanted = wanted
            self.wanted_reason = reason
            assert self.child is not None
            events = self.child.set_wanted(wanted)
            events += self.child.poll(now)
            for ev in events:
                self._child_event(ev)
            key = (
                self.machine.state,
                self.mode.mode,
                n_alloc,
                self.child.pid if self.child.running else None,
                wanted,
                self.degraded,
            )
        if key != self._status_key and self.notifier.enabled:
            self._status_key = key
            self.notifier.status(self.status_line())

    def _child_event(self, ev: ChildEvent) -> None:
        if ev.kind == "started":
            log.info("telemetry child started (pid %s)", ev.pid)
        elif ev.kind == "stopped":
            log.info("telemetry child %s exited (%s)", ev.pid, ev.detail)
        elif ev.kind == "crash":
            log.error("telemetry child %s crashed: %s", ev.pid, ev.detail)
        elif ev.kind == "hung":
            log.error("telemetry child %s hung: %s", ev.pid, ev.detail)
        elif ev.kind == "hung_exited":
            log.info("hung telemetry child %s is gone (%s); restarting", ev.pid, ev.detail)
        else:
            log.error("telemetry child: %s %s", ev.kind, ev.detail)

    def _record(self, from_state: str, to_state: str, reason: str) -> None:
        rec = TransitionRecord(iso_utc_ms(), from_state, to_state, reason)
        log.info("transition %s -> %s: %s", from_state, to_state, reason)
        self.recent.append(rec)
        self.transition_counts[to_state] += 1
        self.transitions.append(rec)

    # ------------------------------------------------------------------ views
    def status_line(self) -> str:
        with self._lock:
            child = self.child
            pid = child.pid if child is not None and child.running else None
            n = self.store.open_count() if self.store is not None else 0
            parts = [
                f"state {self.machine.state.value}",
                f"mode {self.mode.mode.value}",
                f"{n} allocation{'s' if n != 1 else ''}",
                f"telemetry on (pid {pid})"
                if pid
                else ("telemetry starting" if self.wanted else "telemetry off"),
            ]
            if self.degraded:
                parts.append(f"degraded: {self.degraded}")
        return ", ".join(parts)

    def snapshot(self) -> AgentSnapshot:
        with self._lock:
            child = self.child
            return AgentSnapshot(
                version=__version__,
                backend=self.backend,
                start_time_s=self.start_wall,
                state=self.machine.state.value,
                mode=self.mode.mode.value,
                telemetry_active=self.wanted,
                child_up=child is not None and child.running,
                allocations_open=self.store.open_count() if self.store is not None else 0,
                gpu_read_degraded=bool(self.degraded),
                poll_duration_s=self.poll_duration_s,
                transitions=dict(self.transition_counts),
                restarts=dict(child.restarts) if child is not None else {},
                restart_seconds=child.restart_seconds() if child is not None else 0.0,
            )

    def child_metrics(self) -> bytes | None:
        """The recorder's exposition, only from a live child and only if fresh."""
        with self._lock:
            child = self.child
            alive = child is not None and child.running
        if not alive:
            return None
        max_age = 3 * self.settings.interval_s + 1.0
        return read_fresh_metrics(self.settings.run_dir / runtime.METRICS_FILE, max_age)

    def metrics_bytes(self) -> bytes:
        return join_exposition(render_agent(self.snapshot()), self.child_metrics())

    def health(self) -> tuple[bool, str]:
        age = self._clock() - self._last_loop_at
        if age > self.loop_stale_after_s:
            return False, f"agent loop has not advanced for {age:.0f}s"
        return True, self.status_line()

    def status(self) -> dict[str, Any]:
        s = self.settings
        with self._lock:
            child = self.child
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
                }
            allocations = [
                {k: a.get(k) for k in ("id", "gpus", "pid", "start")}
                for a in (self.store.list() if self.store is not None else [])
            ]
            gpus = [
                {
                    "index": d.index,
                    "uuid": d.uuid,
                    "name": d.name,
                    "utilization_gpu_pct": self.utilization.get(d.index),
                }
                for d in self.devices
            ]
            return {
                "ok": True,
                "agent": "running",
                "pid": os.getpid(),
                "version": __version__,
                "state": self.machine.state.value,
                "mode": self.mode.mode.value,
                "mode_until": self.mode.until_iso,
                "telemetry_active": self.wanted,
                "telemetry_reason": self.wanted_reason,
                "utilization_pct": self.util_max,
                "allocations": allocations,
                "gpus": gpus,
                "child": child_info,
                "transitions": [r.as_dict() for r in self.recent],
                "degraded": self.degraded,
                "backend": self.backend,
                "notice": self.notice,
                "log_dir": str(s.log_dir),
                "run_dir": str(s.run_dir),
                "exporter": self.exporter,
                "interval_s": s.interval_s,
            }

    # ------------------------------------------------------------------ control socket
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Control-socket requests (already validated by ``gputel.control.protocol``)."""
        op = request["op"]
        if op == "status":
            return self.status()
        if op == "set_mode":
            return self._set_mode(request["mode"], request.get("for_s"))
        store = self.store
        if store is None:
            return {"ok": False, "error": "agent is starting; try again"}
        if op == "list":
            return {"ok": True, "allocations": store.list()}
        from gputel.control.allocations import AllocationError

        try:
            if op == "allocate":
                result = store.allocate(
                    request["id"], request.get("gpus"), request.get("pid"), self._energy_now()
                )
            elif op == "release":
                result = store.release(request["id"], self._energy_now())
            else:
                return {"ok": False, "error": f"unknown op {op!r}"}
        except AllocationError as exc:
            return {"ok": False, "error": str(exc)}
        self._wake()
        return {"ok": True, **result}

    def _set_mode(self, mode_text: str, for_s: float | None) -> dict[str, Any]:
        mode = Mode(mode_text)
        now = self._clock()
        with self._lock:
            old = self.mode.mode
            new = _ModeState(mode)
            if for_s is not None and mode is not Mode.AUTO:
                new.until_mono = now + for_s
                new.until_iso = iso_utc_ms(time.time() + for_s)
                new.set_for_s = for_s
            self.mode = new
            if old is not mode:
                how = f" for {for_s:g}s" if new.until_mono is not None else ""
                self._record(
                    f"mode_{old.value}",
                    f"mode_{mode.value}",
                    f"operator set mode {mode.value}{how}",
                )
        self._wake()
        return {"ok": True, "mode": mode.value, "until": new.until_iso}

    def _wake(self) -> None:
        if self._waker is not None:
            self._waker.wake()


def run_agent(settings: Settings) -> int:
    """Configure logging for a daemon (plain lines on stderr, the journal) and run."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
    agent = Agent(settings)
    return agent.run()
