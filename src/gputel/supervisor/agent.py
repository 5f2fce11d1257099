"""``gputel agent``: the supervisor daemon.

One loop thread owns all decisions: each tick it reads GPU activity (``gputel.activity``:
utilization, or SM activity under ``GPUTEL_ACTIVITY=sm``), steps the pure state machine, applies
the operator mode and the open allocations, and starts or stops the telemetry child. Other
threads only ask: the control socket (``control_api.py``: status, mode, allocations) and the
HTTP exporter read a snapshot under a lock and wake the loop when something changed.

An NVML call can block forever (a GPU off the bus, a wedged driver) and cannot be cancelled, so
the loop never makes one itself. Each poll reads the GPUs through :class:`~gputel.gpu_readers.
GpuReaders` (one worker thread, GPU after GPU, a deadline per GPU; the recorder reads the same
way): a GPU whose read misses its deadline is *stuck*, its call parked and not asked again until
it returns, and the agent decides from the GPUs that answered while ``gputel status`` and
``/metrics`` name the stuck one. The loop keeps turning, keeps pinging the systemd watchdog and
keeps answering ``gputel status``. Opening the source and listing its GPUs go through a
:class:`~gputel.supervisor.deadline.DeadlineRunner`.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from gputel import __version__, runtime
from gputel.activity import activity_pct
from gputel.control.slurm_jobs import JOB_GONE, SlurmJobWatch
from gputel.formats import FailureCounter, error_line, iso_utc_ms
from gputel.gpu_readers import GpuReaders, Outcome
from gputel.schema import GpuReading
from gputel.settings import Settings
from gputel.supervisor.agent_metrics import join_exposition, read_fresh_metrics, render_agent
from gputel.supervisor.child import ChildEvent, ChildSupervisor, ProcessHandle, Spawn, popen_spawn
from gputel.supervisor.control_api import ControlApi, Degraded, DegradedReason, ModeState
from gputel.supervisor.deadline import DeadlineRunner, Job, run_with_deadline
from gputel.supervisor.events import (
    SOURCE_KMSG,
    SXID,
    SXID_FATAL,
    XID,
    CaptureWindow,
    EventRecorder,
    SameFault,
    describe,
    make_event,
)
from gputel.supervisor.head_handoff import HeadHandoff
from gputel.supervisor.notify import Notifier
from gputel.supervisor.pretrigger import PretriggerRing
from gputel.supervisor.states import ActivityState, Machine, Thresholds, step, telemetry_wanted
from gputel.supervisor.transitions_log import TransitionRecord, TransitionsLog
from gputel.ticker import Ticker, Waker

if TYPE_CHECKING:
    from gputel.control.allocations import AllocationStore
    from gputel.sources.kernel_xid import KernelFault
    from gputel.sources.kmsg import KmsgReader

log = logging.getLogger("gputel.supervisor.agent")

RECENT_TRANSITIONS = 10
ENERGY_DEADLINE_S = 0.5
#: The key of a read of the whole source, for sources that cannot read one GPU alone (sim, smi).
WHOLE = -1
#: Per read kind: the whole-source method and the suffix of its per-GPU form (``read_gpu_…``).
WHOLE_READS = {
    "utilization": ("read_utilization", "utilization"),
    "light": ("read_light", "light"),
    "energy": ("read_energy_j", "energy_j"),
}
#: How often the agent tries again to bind ``/metrics`` while its port is held by another process.
EXPORTER_RETRY_S = 5.0
#: The exporter thread wakes this often when nobody scrapes; each wake-up costs CPU on an idle node.
HTTP_POLL_S = 5.0


class AgentError(RuntimeError):
    """The agent cannot start; ``str()`` is one line saying why and what to do."""


class AgentConfigError(AgentError):
    """A setting names something this node does not have (e.g. a GPU index): exit 2, no restart."""


class AgentAlreadyRunning(AgentError):
    """Another agent holds this run directory's lock."""


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
def _pci_map(devices: list[Any]) -> dict[str, int]:
    """GPU index by PCI address in the kernel log's form, for the GPUs whose address is known."""
    from gputel.sources.kernel_xid import pci_key

    out: dict[str, int] = {}
    for d in devices:
        key = pci_key(getattr(d, "pci_bus_id", "") or "")
        if key is not None:
            out[key] = d.index
    return out


def _take_lock(run_dir: Path) -> int:
    try:
        return runtime.take_agent_lock(run_dir)
    except runtime.LockHeld as exc:
        raise AgentAlreadyRunning(str(exc)) from None
    except runtime.RunDirError as exc:
        raise AgentError(str(exc)) from None


class Agent:
    """The supervisor. ``run()`` blocks until SIGTERM/SIGINT or :meth:`request_stop`."""

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        *,
        env: Mapping[str, str] | None = None,
        spawn: Spawn = popen_spawn,
        install_signals: bool = True,
        source_open_timeout_s: float = 30.0,
        source: Any = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._env = dict(os.environ if env is None else env)
        self._spawn = spawn
        self._install_signals = install_signals
        self._source_open_timeout_s = source_open_timeout_s
        self.thresholds = Thresholds.of(settings)
        self.read_deadline_s = max(0.5, min(settings.interval_s, 5.0))
        self.loop_stale_after_s = max(10.0, 3 * settings.interval_s)

        self.lock = threading.RLock()
        self._stop = False
        self._hup = False
        self._waker: Waker | None = None
        self.lock_fd: int | None = None
        self._ready_sent = False
        self._status_key: tuple[Any, ...] | None = None
        self._progress = 0
        self._last_loop_at = clock()
        self.start_wall = time.time()

        self.machine = Machine(ActivityState.IDLE, clock())
        self.mode = ModeState()
        self.wanted = False
        self.wanted_reason = "not started"
        self.recent: collections.deque[TransitionRecord] = collections.deque(
            maxlen=RECENT_TRANSITIONS
        )
        self.transition_counts: collections.Counter[str] = collections.Counter()
        self.utilization: dict[int, float | None] = {}
        """Per GPU, its utilization at the last poll (a MIG GPU, which has none: its activity)."""
        self.activity: dict[int, float | None] = {}
        """Per GPU, what the state machine judged at the last poll (``gputel.activity``)."""
        self.light: dict[int, GpuReading] = {}
        """Per GPU, the last light read (empty without a pre-trigger or ``sm`` activity):
        ``gputel status`` shows its values while no recorder runs (``gputel.gpu_status``)."""
        self.light_at: float | None = None
        """Epoch seconds of that read; formatted only when ``gputel status`` asks."""
        self.util_max: float | None = None
        self.poll_duration_s: float | None = None
        self.degraded: Degraded | None = None
        self.notice: str | None = None
        self.backend = settings.backend
        self.devices: list[Any] = []
        self.exporter: str | None = None
        self.exporter_error: str | None = None
        """Why ``/metrics`` is not served (its port held by another process...), while it is not."""
        self._http_retry_at: float | None = None
        self.sim_epoch: float | None = None
        self._session_spawned = False

        self.events = EventRecorder(settings.log_dir)
        """GPU events: events.csv, the counters on /metrics, the recent ones for status."""
        self.capture = CaptureWindow(settings.event_capture_s)
        self.listener: Any = None
        """The source's GPU event listener (None: the source has none, or not opened yet)."""
        self.kmsg: KmsgReader | None = None
        """The kernel log reader (None: ``GPUTEL_KMSG`` empty, or simulated GPUs)."""
        self.same_fault = SameFault()
        """One fault from NVML and the kernel log is one event."""
        self._uuids: dict[int, str] = {}
        self._by_pci: dict[str, int] = {}
        """GPU index by PCI address in the kernel's form, from the identities read at start."""

        self.handoff: HeadHandoff | None = None
        """The pre-trigger ring and its hand-off to the child (None: pre-trigger off)."""

        self.gpu = DeadlineRunner(clock)
        self.source: Any = None
        self._given_source = source
        self._source_job: Job | None = None
        self.readers = GpuReaders(self.read_deadline_s, clock=clock, name="agent-gpu")
        """Each poll's per-GPU reads, in turn on one worker; a hung GPU's call is parked there."""
        self.stuck: list[int] = []
        """GPUs whose read of the last poll is parked (not returned within its deadline)."""
        self.store: AllocationStore | None = None
        self.slurm_jobs = SlurmJobWatch()
        self.child: ChildSupervisor | None = None
        self.transitions = TransitionsLog(settings.log_dir)
        self.notifier = Notifier(self._env, clock)
        wd = self.notifier.watchdog_interval_s
        if wd is not None:
            # The first stuck read blocks the loop for the whole deadline; pings must not lapse.
            self.read_deadline_s = min(self.read_deadline_s, max(0.2, wd / 2))
        self.api = ControlApi(self)
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
        self.lock_fd = _take_lock(s.run_dir)
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
        # Before the GPU source: kernel log Xids are read even while NVML hangs in its start.
        self._start_kmsg()
        self._open_source()
        known = [d.index for d in self.devices]
        from gputel.control.allocations import AllocationStore

        self.store = AllocationStore(
            s.run_dir, s.log_dir, known, ask_recorder=self._ask_recorder_to_publish
        )
        self.child = ChildSupervisor(
            s, sim_epoch=self.sim_epoch, spawn=self._spawn_child, clock=self.clock
        )

        # /metrics first: whoever gets an answer on the control socket may scrape at once.
        if s.exporter_port:
            self._start_http(self.clock())

        from gputel.control.client import socket_path
        from gputel.control.protocol import ControlSocketInUse
        from gputel.control.server import ControlServer

        self._control = ControlServer(socket_path(s.run_dir), self.api.handle)
        try:
            self._control.start()
        except ControlSocketInUse as exc:
            self._control = None
            raise AgentAlreadyRunning(str(exc)) from None
        except OSError as exc:
            self._control = None
            raise AgentError(f"cannot create the control socket: {exc}") from None
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
        self._reconcile(self.clock())
        self.notifier.ready(self.api.status_line())
        self._ready_sent = True

    def _start_http(self, now: float) -> None:
        """Serve ``/metrics``; when the port cannot be had, say so and try again later.

        The agent keeps recording (CSV, hooks, the control socket) without its exporter, but it
        never hides that: the first failure is logged as an error naming the address, ``gputel
        status`` and the systemd STATUS line show it until the port is free, and a bind is tried
        again every ``EXPORTER_RETRY_S``. Exiting instead would stop CSV recording too, and
        systemd's start limit would soon stop retrying altogether.
        """
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
        addr = s.exporter_addr
        host = f"[{addr}]" if ":" in addr else addr
        try:
            server.start()
        except OSError as exc:
            error = str(exc.strerror or exc)  # names the address: "cannot serve /metrics on …"
            if self.exporter_error is None:
                log.error(
                    "%s; recording goes on without /metrics, binding again every %gs (free "
                    "the port or set GPUTEL_EXPORTER_PORT)",
                    error,
                    EXPORTER_RETRY_S,
                )
            with self.lock:
                self.exporter_error = error
            self._http_retry_at = now + EXPORTER_RETRY_S
            return
        self._http = server
        with self.lock:
            if self.exporter_error is not None:
                log.warning("serving /metrics on %s:%d now", host, server.port)
            self.exporter_error = None
            self.exporter = f"{host}:{server.port}"
        self._http_retry_at = None

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
            job = self.gpu.submit(lambda: open_gpu_source(self.settings, env, self.clock))
        assert job is not None
        if self.gpu.wait(job, self._source_open_timeout_s):
            self._source_opened(job)
        else:
            self._source_job = job
            self.degraded = Degraded(DegradedReason.SOURCE_OPENING)
            log.error(
                "opening the GPU source (%s) takes more than %gs; running degraded until it "
                "answers",
                self.settings.backend,
                self._source_open_timeout_s,
            )

    def _source_opened(self, job: Job) -> None:
        from gputel.sources.base import GpuSelectionError, GpuSourceError

        self._source_job = None
        if job.error is not None:
            if isinstance(job.error, GpuSelectionError):
                raise AgentConfigError(str(job.error))
            if isinstance(job.error, GpuSourceError):
                raise AgentError(str(job.error))
            raise AgentError(f"cannot open the GPU source: {error_line(job.error)}")
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
        self._uuids = {d.index: d.uuid for d in self.devices}
        self._by_pci = _pci_map(self.devices)
        self._start_listener(source)
        s = self.settings
        if s.pretrigger_s > 0 and self.devices:
            ring = PretriggerRing(s.pretrigger_s, s.interval_s, self.devices)
            self.handoff = HeadHandoff(s.run_dir, ring)
            self.handoff.remove_stale()
        if self.degraded is not None and self.degraded.reason is DegradedReason.SOURCE_OPENING:
            self.degraded = None

    def _start_listener(self, source: Any) -> None:
        """Listen for GPU events for as long as the agent runs, telemetry on or off."""
        make = getattr(source, "event_listener", None)
        if not callable(make):
            return
        try:
            listener = make()
            listener.start(self._gpu_event)
        except Exception as exc:
            log.error("GPU events are not received: the listener did not start (%s)", exc)
            return
        self.listener = listener

    def _start_kmsg(self) -> None:
        """Follow the kernel log for Xid lines, for as long as the agent runs. Simulated GPUs
        have no kernel lines: with them the log is not read."""
        path = self.settings.kmsg
        if not path or self.settings.backend == "sim":
            return
        from gputel.sources.kmsg import KmsgReader

        reader = KmsgReader(path)
        reader.start(self._kernel_fault)
        self.kmsg = reader

    def _kernel_fault(self, fault: KernelFault) -> None:
        """One Xid or SXid line from the kernel log, on the reader's thread."""
        if fault.kind == XID:
            gpu = self._by_pci.get(fault.pci)
            event, xid = XID, fault.number
        else:
            gpu, event, xid = None, SXID_FATAL if fault.fatal else SXID, None
        self._gpu_event(gpu, event, xid, source=SOURCE_KMSG, note=f"kernel: {fault.line}")

    def _gpu_event(
        self,
        gpu: int | None,
        event: str,
        xid: int | None,
        *,
        source: str | None = None,
        note: str = "",
    ) -> None:
        """One GPU event, on a listener's thread: record it (once, where NVML and the kernel
        log both report it), open the capture window, wake the loop so the capture starts now
        rather than at the next tick."""
        source = source or self.backend
        if self.same_fault.seen(gpu, event, xid, source, self.clock()):
            log.debug("%s %s on GPU %s: already recorded from another source", source, event, gpu)
            return
        try:
            ev = make_event(
                time.time(),
                gpu,
                None if gpu is None else self._uuids.get(gpu),
                event,
                xid,
                self._allocations_on(gpu),
                source,
                note,
            )
        except ValueError as exc:
            log.error("GPU event on GPU %s not recorded: %s", gpu, exc)
            return
        self.events.record(ev)
        with self.lock:
            opened = self.capture.trigger(ev, self.clock())
        if opened:
            self.events.lines.log(
                f"capture after {describe(ev)}",
                logging.INFO,
                "telemetry forced on for %gs: capture after %s",
                self.capture.seconds,
                describe(ev),
            )
        self.wake()

    def _allocations_on(self, gpu: int | None) -> list[str]:
        """Ids of the allocations open on GPU ``gpu`` (those without a GPU list claim all); on
        no known GPU (an NVSwitch, an unknown PCI address), every open allocation."""
        store = self.store
        if store is None:
            return []
        return [
            str(a["id"])
            for a in store.list()
            if gpu is None or a.get("gpus") is None or gpu in a["gpus"]
        ]

    def _teardown(self) -> None:
        if self._ready_sent:
            self.notifier.stopping()
        if self.listener is not None:
            # Never joined: its thread may be blocked inside the driver's wait.
            self.listener.stop()
        if self.kmsg is not None:
            self.kmsg.stop()
        if self._control is not None:
            self._control.stop()
            self._control = None
        if self.child is not None:
            with self.lock:
                was = self.child.proc is not None
            self.child.shutdown()
            if was:
                log.info("telemetry child stopped")
        if self._http is not None:
            # stop() waits for the server's next poll (up to HTTP_POLL_S); the process is about
            # to exit, so give it a moment and let a daemon thread finish the job.
            run_with_deadline(self._http.stop, 0.2, name="gputel-http-stop")
            self._http = None
        if self._waker is not None:
            self._waker.close()
            self._waker = None
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None
        self.notifier.close()
        if self._ready_sent:
            log.info("gputel agent stopped")

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        ticker = Ticker(self.settings.interval_s, clock=self.clock, wait=self._wait)
        while not self._stop:
            k = ticker.next()
            if self._stop:
                break
            if self._hup:
                self._hup = False
                with self.lock:
                    forwarded = self.child is not None and self.child.forward_signal(signal.SIGHUP)
                log.info(
                    "SIGHUP: %s",
                    "forwarded to the telemetry child"
                    if forwarded
                    else "not forwarded, no telemetry child up (a new one opens new files)",
                )
            now = self.clock()
            self.events.lines.flush()
            if k is None:
                self._reconcile(now)
            else:
                self.tick(now)
            if self._http_retry_at is not None and self.clock() >= self._http_retry_at:
                self._start_http(self.clock())

    def _wait(self, timeout: float) -> bool:
        """The ticker's sleep, cut into watchdog-sized slices; True when woken early."""
        assert self._waker is not None
        end = self.clock() + timeout
        while True:
            self._progress += 1
            self._last_loop_at = self.clock()
            self.notifier.watchdog(self._progress)
            remaining = end - self.clock()
            if remaining <= 0:
                return False
            nxt = self.notifier.next_ping_in()
            chunk = remaining if nxt is None else min(remaining, max(nxt, 0.01))
            if self._waker.wait(chunk) or self._stop:
                return True

    def tick(self, now: float) -> None:
        """One poll: read, step the machine, then reconcile mode, allocations and the child."""
        util = self._read_utilization()
        now = self.clock()
        with self.lock:
            self.machine, tr = step(self.machine, util, now, self.thresholds)
            if tr is not None:
                self.record(tr.from_state.value, tr.to_state.value, tr.reason)
        self._reap()
        self._reconcile(now)
        if self.handoff is not None and self.child is not None:
            # After the child's poll, which has just read its heartbeat.
            self.handoff.tick(
                now,
                child_running=self.wanted and self.child.proc is not None,
                child_ticking=self.child.fresh_heartbeat() is not None,
            )

    def _read_utilization(self) -> float | None:
        if self.source is None:
            job = self._source_job
            if job is not None and job.done.is_set():
                try:
                    self._source_opened(job)
                except AgentError as exc:
                    self._source_job = None
                    self.degraded = Degraded(DegradedReason.SOURCE_FAILED, str(exc))
                    log.error("%s", self.degraded)
            if self.source is None:
                return None
        t0 = self.clock()
        handoff = self.handoff
        keep = handoff is not None and handoff.wants_readings(self.wanted)
        # With a pre-trigger the light read replaces the utilization read (its cheap fields also
        # give status its power), whether or not this tick's readings go into the ring; SM
        # activity comes with the light read only (GPM needs its sample every tick).
        light = handoff is not None or self.settings.activity == "sm"
        wall = time.time()
        outcomes = self._read_gpus("light" if light else "utilization", self.read_deadline_s)
        self.poll_duration_s = self.clock() - t0
        readings: list[GpuReading] = []
        values: dict[int, float | None] = {}
        utilization: dict[int, float | None] = {}
        for key, (status, value) in outcomes.items():
            if status != "ok":
                continue
            if not light:
                values.update(value if key == WHOLE else {key: value})
                continue
            for r in value if key == WHOLE else [value]:
                readings.append(r)
                values[r.index] = activity_pct(r, self.settings.activity)
                utilization[r.index] = None if r.lost else r.utilization_gpu_pct
        if not light:
            utilization = values
        self._read_health(outcomes)
        if keep and readings:
            # A GPU missing here (stuck, failed) has empty values in this tick's ring row.
            assert handoff is not None
            handoff.ring.add(t0, wall, readings)
        for d in self.devices:
            values.setdefault(d.index, None)
            utilization.setdefault(d.index, None)
        light_readings = {r.index: r for r in readings}
        known = [v for v in values.values() if v is not None]
        with self.lock:
            self.utilization = utilization
            self.activity = values
            self.light = light_readings
            self.light_at = wall if light_readings else None
            self.util_max = max(known) if known else None
        return self.util_max

    def _read_gpus(self, kind: str, budget_s: float) -> dict[int, Outcome]:
        """One round of ``kind`` reads (``utilization``, ``light``, ``energy``): each GPU on its
        own budget where the source reads one GPU alone, else the whole source as one read
        (key ``WHOLE``)."""
        source = self.source
        per_gpu = getattr(source, f"read_gpu_{WHOLE_READS[kind][1]}", None)
        if per_gpu is not None:
            calls = [(d.index, partial(per_gpu, d.index)) for d in self.devices]
        else:
            calls = [(WHOLE, getattr(source, WHOLE_READS[kind][0]))]
        return self.readers.read(calls, budget_s)

    def _read_health(self, outcomes: dict[int, Outcome]) -> None:
        """Stuck and failed GPUs of this poll: ``stuck``, ``degraded`` and their log lines."""
        stuck = sorted(k for k, (status, _) in outcomes.items() if status == "stuck")
        failed = {k: v for k, (status, v) in outcomes.items() if status == "error"}
        was = set(self.stuck)
        for key in stuck:
            if key not in was:
                log.error(
                    "%s did not return within %gs; %s",
                    "the GPU read" if key == WHOLE else f"GPU {key}'s read",
                    self.read_deadline_s,
                    "running degraded (no activity decisions) until it does"
                    if key == WHOLE
                    else "deciding from the other GPUs until it returns",
                )
        if was - set(stuck):
            log.warning("the stuck GPU read returned; GPU reads resume")
        degraded: Degraded | None = None
        if stuck:
            degraded = Degraded(DegradedReason.READ_STUCK, self._stuck_detail(stuck))
        elif failed:
            detail = ", ".join(
                type(exc).__name__ if key == WHOLE else f"GPU {key}: {type(exc).__name__}"
                for key, exc in sorted(failed.items())
            )
            degraded = Degraded(DegradedReason.READ_FAILED, detail)
            if self.degraded is None or self.degraded.reason is not DegradedReason.READ_FAILED:
                log.error("GPU utilization read failed: %s", "; ".join(map(str, failed.values())))
        elif self.degraded is not None and self.degraded.reason.is_read:
            log.info("GPU utilization reads work again")
        if degraded is not None or (self.degraded is not None and self.degraded.reason.is_read):
            self.degraded = degraded
        with self.lock:
            self.stuck = [d.index for d in self.devices] if WHOLE in stuck else stuck

    def _stuck_detail(self, stuck: list[int]) -> str:
        """``for 7s`` (the whole source), ``GPU 1 for 7s, GPU 3 for 2s``; empty while new."""
        parts = []
        for key in stuck:
            seconds = self.readers.stuck_for(key)
            if seconds is None or seconds < self.read_deadline_s:
                continue
            parts.append(f"for {seconds:.0f}s" if key == WHOLE else f"GPU {key} for {seconds:.0f}s")
        return ", ".join(parts)

    def energy_now(self) -> dict[int, float | None]:
        """The energy counter per GPU; None for a GPU that is stuck, failed or has none."""
        if self.source is None:
            return {}
        out: dict[int, float | None] = {d.index: None for d in self.devices}
        for key, (status, value) in self._read_gpus("energy", ENERGY_DEADLINE_S).items():
            if status != "ok":
                continue
            if key == WHOLE:
                out.update(value if isinstance(value, dict) else {})
            else:
                out[key] = value
        return out

    def _reap(self) -> None:
        store = self.store
        if store is None or store.open_count() == 0:
            return
        try:
            reaped = store.reap_dead_owners(LazyEnergy(self.energy_now), self.events.take_xids)
        except Exception:
            log.exception("reaping allocations of exited owners failed")
            return
        for summary in reaped:
            log.info("allocation %s released: %s", summary.get("id"), summary.get("release_reason"))
        # Prolog-opened allocations have no owner process: Slurm says when their job is gone.
        hooked = [a["id"] for a in store.list() if a.get("pid") is None]
        for ident in self.slurm_jobs.gone(hooked):
            try:
                store.release(ident, LazyEnergy(self.energy_now), JOB_GONE, self.events.take_xids)
            except Exception:
                log.exception("releasing %s after its Slurm job ended failed", ident)

    def _reconcile(self, now: float) -> None:
        """Mode expiry, telemetry decision, child lifecycle, sd_notify STATUS."""
        with self.lock:
            m = self.mode
            if m.until_mono is not None and now >= m.until_mono:
                old = m.mode
                self.mode = ModeState()
                self.record(
                    f"mode_{old.value}", "mode_auto", f"mode {old.value} for {m.set_for_s:g}s ended"
                )
            n_alloc = self.open_allocations()
            capture = self.capture.reason if self.capture.active(now) else None
            wanted, reason = telemetry_wanted(self.machine.state, self.mode.mode, n_alloc, capture)
            if wanted != self.wanted:
                # A new session's first child gets the head; a restart within it does not.
                self._session_spawned = False
                self.record(
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
                self.exporter_error,
            )
        if key != self._status_key and self.notifier.enabled:
            self._status_key = key
            self.notifier.status(self.api.status_line())

    def _spawn_child(self, argv: list[str], env: dict[str, str]) -> ProcessHandle:
        """Start the recorder child; a new session's child gets the pre-trigger head first."""
        if self.handoff is not None and not self._session_spawned:
            self.handoff.session_starting(self.clock())
        self._session_spawned = True
        return self._spawn(argv, env)

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

    def record(self, from_state: str, to_state: str, reason: str) -> None:
        rec = TransitionRecord(iso_utc_ms(), from_state, to_state, reason)
        log.info("transition %s -> %s: %s", from_state, to_state, reason)
        self.recent.append(rec)
        self.transition_counts[to_state] += 1
        self.transitions.append(rec)

    # ------------------------------------------------------------------ views
    def open_allocations(self) -> int:
        return self.store.open_count() if self.store is not None else 0

    def _ask_recorder_to_publish(self) -> float:
        """Ask a recorder that publishes less often than it ticks to publish now (SIGUSR1), for
        a release summary; how long to wait for it (0: it publishes every tick, or none runs)."""
        child = self.child
        if child is None or self.settings.interval_s >= runtime.PUBLISH_EVERY_S:
            return 0.0
        try:
            asked = child.forward_signal(signal.SIGUSR1)
        except Exception:  # a release must never fail for the sake of fresher statistics
            log.exception("asking the recorder to publish failed")
            return 0.0
        return 3 * self.settings.interval_s + 0.5 if asked else 0.0

    def child_metrics(self) -> bytes | None:
        """The recorder's exposition, only from a live child and only if fresh."""
        with self.lock:
            child = self.child
            alive = child is not None and child.running
        if not alive:
            return None
        max_age = 3 * runtime.publish_period(self.settings.interval_s) + 1.0
        return read_fresh_metrics(self.settings.run_dir / runtime.METRICS_FILE, max_age)

    def write_counters(self) -> list[tuple[str, FailureCounter]]:
        """The agent's appended files and their failure counters (status, /metrics)."""
        counters = [
            ("transitions.csv", self.transitions.failures),
            ("events.csv", self.events.log.failures),
        ]
        if self.store is not None:
            counters.append(("allocations.csv", self.store.summary_failures))
        return counters

    def metrics_bytes(self) -> bytes:
        return join_exposition(render_agent(self.api.snapshot()), self.child_metrics())

    def health(self) -> tuple[bool, str]:
        age = self.clock() - self._last_loop_at
        if age > self.loop_stale_after_s:
            return False, f"agent loop has not advanced for {age:.0f}s"
        return True, self.api.status_line()

    def wake(self) -> None:
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
