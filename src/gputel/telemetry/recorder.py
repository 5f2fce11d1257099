"""``gputel record``: the tick loop that feeds one sample per tick to the CSV files and exposition.

A child's first tick is preceded by the pre-trigger head the agent left in the run directory
(``telemetry/head.py``): GPU rows from before the session started, at the head of its first
``gpu-*.csv``.

Per tick: read allocations (only when ``allocations.json`` changed), sample every source, write
the CSV rows and count the open allocations' statistics. Then, when a publication is due, render
the exposition and publish ``metrics.prom`` and ``recorder.json`` in the run directory (atomic
replace): every tick at intervals of a second or more, else about once a second
(``runtime.publish_period``), and at once when the open allocations changed and when the
recorder stops. ``recorder.json``'s ``monotonic``/``tick`` are the heartbeat the agent watches: a
hung child stops moving them, a slow one does not. An allocation that ended stays in
``recorder.json`` (``ended_allocations``) for ``ENDED_KEPT_S``: the agent's release summary
takes its statistics from there, over exactly the ticks it was open.

Signals only set flags and wake the wait, so a signal never lands in the middle of a row:
SIGTERM/SIGINT finish the current tick, close the files and exit 0; SIGHUP starts new files
(logrotate's postrotate); SIGUSR1 publishes at once, between ticks (the agent, before it
summarises a released allocation).

This module is on the daemon path: no ``rich``, logging to stderr only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

from gputel import lineage, runtime
from gputel.allocstats import AllocationStats
from gputel.control.allocations import SummaryLog, parse_store, recorder_stats_entry
from gputel.formats import atomic_write_fixed_tmp, finite, iso_utc_ms
from gputel.gpu_status import reading_values
from gputel.schema import ProcessRecord, Sample
from gputel.settings import Settings
from gputel.sources.base import GpuSource, HostSource
from gputel.sources.pods import PodNames
from gputel.supervisor.write_failures import RECORDER_CSV, entries
from gputel.telemetry.allocation_info import AllocationNames
from gputel.telemetry.csv_sink import DEFAULT_MAX_BYTES, CsvSink
from gputel.telemetry.exposition import Exposition
from gputel.telemetry.gpu_deadline import with_read_deadline
from gputel.telemetry.head import HeadTick, head_rows, take_head
from gputel.telemetry.jobs import DetectedJobs, ProcessAttribution, merge_ids
from gputel.telemetry.metrics_http import MetricsServer
from gputel.telemetry.promtext import telemetry_active_text
from gputel.telemetry.sampler import Sampler, utc_now
from gputel.ticker import Ticker, Waker

log = logging.getLogger("gputel.record")

#: Seconds an ended allocation's statistics stay in ``recorder.json`` for the agent's summary.
ENDED_KEPT_S = 60.0
#: At most this many ended allocations are kept (the newest).
ENDED_KEPT_MAX = 64


@dataclass(frozen=True, slots=True)
class OpenAllocation:
    id: str
    gpus: tuple[int, ...] | None
    """None: every recorded GPU."""
    start: str


class AllocationWatcher:
    """Reads ``allocations.json`` only when it changed (one ``stat`` per tick otherwise)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self.allocations: tuple[OpenAllocation, ...] = ()
        self._warned = False

    def poll(self) -> bool:
        """Refresh from disk if the file changed; True when the set of allocations changed."""
        try:
            st = os.stat(self.path)
            key = (st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            key = None
        if key == self._key:
            return False
        self._key = key
        new = self._load() if key is not None else ()
        changed = new != self.allocations
        self.allocations = new
        return changed

    def _load(self) -> tuple[OpenAllocation, ...]:
        allocs = parse_store(runtime.read_json(self.path))
        if allocs is None:
            if not self._warned:
                self._warned = True
                log.warning("ignoring %s: not an allocation list", self.path)
            return ()
        return tuple(
            OpenAllocation(a.id, None if a.gpus is None else tuple(a.gpus), a.start) for a in allocs
        )


_ACTIVE = telemetry_active_text(True)


class Recorder:
    """Wires sampler → CSV sink → exposition → run-directory files, one tick at a time."""

    def __init__(
        self,
        settings: Settings,
        gpu_source: GpuSource,
        host_sources: Sequence[HostSource] = (),
        *,
        write_runtime: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utc_now,
        max_file_bytes: int = DEFAULT_MAX_BYTES,
        hostname: str | None = None,
        parent_pid: int | None = None,
        head: Sequence[HeadTick] = (),
    ) -> None:
        self.settings = settings
        # A child whose agent died (SIGKILL, OOM) would otherwise record forever, orphaned.
        self._parent_pid = parent_pid
        self.gpu_source = gpu_source
        self._clock = clock
        self.sampler = Sampler(gpu_source, host_sources, clock=clock, wallclock=wallclock)
        self.sink = CsvSink(
            settings.log_dir,
            host=hostname,
            max_bytes=max_file_bytes,
            interval_s=settings.interval_s,
        )
        self.exposition = Exposition()
        self.waker = Waker()
        self.ticker = Ticker(settings.interval_s, clock=clock, wait=self.waker.wait)
        self.run_dir = settings.run_dir
        self.write_runtime = write_runtime
        self.allocations = AllocationWatcher(self.run_dir / runtime.ALLOCATIONS_FILE)
        self._alloc_ids: tuple[str, ...] = ()
        self._gpu_alloc: dict[int, tuple[str, ...]] = {}
        self._announced = self._announced_by_gpu()
        self._alloc_stats: dict[str, AllocationStats] = {}
        self._alloc_start: dict[str, str] = {}
        self._ended: dict[str, tuple[float, dict[str, object]]] = {}
        """Allocations that ended: id -> (when, on our clock; their final statistics)."""
        self._publish_s = runtime.publish_period(settings.interval_s) - 0.5 * settings.interval_s
        """A publication is due this long after the last one (half a tick early, so jitter
        does not push it a whole tick later)."""
        self._published_at: float | None = None
        """``monotonic`` of the sample published last."""
        self._latest: Sample | None = None
        self._publish_asked = False
        self.attribution = ProcessAttribution(settings.proc_root)
        if self.attribution.notice:
            log.warning("%s", self.attribution.notice)
        self._summary_log = SummaryLog(settings.log_dir)
        self.detected = DetectedJobs(self._summary_log, settings.interval_s)
        self.names = AllocationNames(PodNames(settings.pod_logs_dir))
        self._wallclock = wallclock
        self._previous_state: object = (
            runtime.read_json(self.run_dir / runtime.RECORDER_STATE_FILE) if write_runtime else None
        )
        """The last ``recorder.json`` of the recorder before us (a crashed or stopped child):
        the statistics of allocations still open go on from it, and our first rows' energy
        joins its last ones."""
        self.sink.last_power.update(last_power_from(self._previous_state))
        now = clock()
        for ident, entry in ended_from(self._previous_state).items():
            self._ended[ident] = (now, entry)
        self.ticks = 0
        self.last_tick_monotonic: float | None = None
        self._stop = False
        self._reopen = False
        self._runtime_failing = False
        self._pid = os.getpid()
        self._head: Sequence[HeadTick] | None = head
        """The pre-trigger ticks, written before the first sample (then None)."""
        self.head_ticks = 0
        self.head_s = 0.0
        """How many head ticks were written and how far before the first own row they begin."""
        self._metrics_path = self.run_dir / runtime.METRICS_FILE
        self._state_path = self.run_dir / runtime.RECORDER_STATE_FILE

    # ------------------------------------------------------------------ control
    def request_stop(self) -> None:
        self._stop = True
        self.waker.wake()

    def request_reopen(self) -> None:
        self._reopen = True
        self.waker.wake()

    def request_publish(self) -> None:
        self._publish_asked = True
        self.waker.wake()

    def install_signal_handlers(self) -> None:
        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reopen()

        def on_usr1(signum: int, frame: FrameType | None) -> None:
            self.request_publish()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGUSR1, on_usr1)

    # ------------------------------------------------------------------ loop
    def run(self) -> int:
        """Tick until asked to stop; returns the exit code (0)."""
        try:
            while not self._stop:
                k = self.ticker.next()
                if self._reopen:
                    self._reopen = False
                    self.sink.reopen()
                    log.info("SIGHUP: new CSV files from the next row")
                if self._stop:
                    break
                if self._publish_asked:
                    self._publish_asked = False
                    self.publish_now()
                if self._parent_pid is not None and os.getppid() != self._parent_pid:
                    log.warning("agent (pid %d) is gone; stopping", self._parent_pid)
                    break
                if k is None:
                    continue
                self.tick()
        finally:
            self.close()
        return 0

    def close(self) -> None:
        if self.ticks:
            self.detected.close_all(self._wallclock())
        latest = self._latest
        if latest is not None and latest.monotonic != self._published_at:
            # The statistics since the last publication: a successor goes on from them.
            self._render_and_publish(latest)
        self.sink.close()
        self.waker.close()

    def tick(self) -> Sample:
        changed = self.allocations.poll()
        if changed:
            self._update_allocations()
        sample = self.sampler.sample(self._alloc_ids, self._gpu_alloc)
        self._attribute(sample)
        self.ticks += 1
        if self._head is not None:
            self._write_head(sample)
        self.sink.write(sample)
        shares = self.sink.tick_energy
        for alloc in self.allocations.allocations:
            stats = self._alloc_stats[alloc.id]
            stats.add_tick(sample.gpus, alloc.gpus, self.settings.interval_s)
            stats.add_energy(shares, alloc.gpus)
        self.detected.add_energy(shares)
        self.last_tick_monotonic = self._clock()
        self._latest = sample
        last = self._published_at
        if changed or last is None or sample.monotonic - last >= self._publish_s:
            self._render_and_publish(sample)
        return sample

    def publish_now(self) -> None:
        """Between ticks: take the open allocations as they are now (one that ended moves to
        ``ended_allocations``) and publish the latest tick with them."""
        if self.allocations.poll():
            self._update_allocations()
        if self._latest is not None:
            self._render_and_publish(self._latest)

    def _render_and_publish(self, sample: Sample) -> None:
        """The exposition of ``sample`` and, under an agent, the run directory's files."""
        self._published_at = sample.monotonic
        data = self.exposition.update(
            sample,
            ticks_missed=self.ticker.missed,
            # Its per-second files and the detected jobs' allocations.csv rows.
            rows_failed=self.sink.rows_failed + self._summary_log.rows_failed,
            ticks_total=self.ticks,
            allocations=self.names.infos(
                [*self._alloc_ids, *self.detected.ids()], sample.processes
            ),
        )
        if self.write_runtime:
            self._publish(sample, data)

    def _process_json(self, process: ProcessRecord) -> dict[str, object]:
        """A process for ``recorder.json`` (``gputel status``): a pod's namespace and name
        beside its ``k8s-<uid>`` job, when the kubelet's pod log directory names it."""
        out: dict[str, object] = process.to_json()
        names = self.names.pod_of(process.job)
        if names is not None:
            out["namespace"], out["pod"] = names
        return out

    def _attribute(self, sample: Sample) -> None:
        """Owners of this tick's GPU processes, and the jobs they belong to as allocations of
        their GPUs (``telemetry/jobs.py``): merged into each GPU row's allocations."""
        sample.processes = self.attribution.records(sample.gpus)
        announced = self._announced
        detected, _ = self.detected.update(sample, announced, self._alloc_ids)
        if detected:
            sample.gpu_allocations = {
                gpu: merge_ids(ids, detected.get(gpu, ())) if ids else detected.get(gpu, ())
                for gpu, ids in announced.items()
            }

    def _announced_by_gpu(self) -> dict[int, tuple[str, ...]]:
        """Per GPU, the announced allocations that claim it (changes only with them)."""
        return {
            d.index: self._gpu_alloc.get(d.index, self._alloc_ids) for d in self.sampler.devices
        }

    def _write_head(self, first: Sample) -> None:
        ticks = head_rows(
            self._head or (),
            first.timestamp,
            first.monotonic,
            self.sampler.devices,
            self.settings.interval_s,
        )
        self._head = None
        if not ticks:
            return
        self.sink.write_head(ticks)
        self.head_ticks = len(ticks)
        self.head_s = first.monotonic - ticks[0].monotonic
        log.info(
            "wrote %d pre-trigger tick(s) (%.1f s before the first sample) at the head of %s",
            self.head_ticks,
            self.head_s,
            self.sink.gpu_path,
        )

    def _update_allocations(self) -> None:
        allocs = self.allocations.allocations
        self._alloc_ids = tuple(a.id for a in allocs)
        gpu_alloc: dict[int, tuple[str, ...]] = {}
        for d in self.sampler.devices:
            gpu_alloc[d.index] = tuple(a.id for a in allocs if a.gpus is None or d.index in a.gpus)
        self._gpu_alloc = gpu_alloc if allocs else {}
        self._announced = self._announced_by_gpu()
        current = {a.id: a for a in allocs}
        now = self._clock()
        # An id released and opened again between two polls is a new allocation (new start).
        ended = [
            i
            for i in self._alloc_stats
            if i not in current or current[i].start != self._alloc_start[i]
        ]
        for gone in ended:
            stats = self._alloc_stats.pop(gone)
            self._ended.pop(gone, None)
            self._ended[gone] = (now, {"start": self._alloc_start[gone], **stats.to_json()})
        self._alloc_start = {a.id: a.start for a in allocs}
        previous, self._previous_state = self._previous_state, None
        for a in allocs:
            if a.id not in self._alloc_stats:
                entry = recorder_stats_entry(previous, a.id, a.start)
                carried = AllocationStats.from_json(entry) if entry is not None else None
                self._alloc_stats[a.id] = carried or AllocationStats()

    def _drop_old_ended(self) -> None:
        """Forget ended allocations older than ``ENDED_KEPT_S``, and all but the newest
        ``ENDED_KEPT_MAX`` (oldest first: they are kept in the order they ended)."""
        now = self._clock()
        for ident, (when, _) in list(self._ended.items()):
            if now - when > ENDED_KEPT_S or len(self._ended) > ENDED_KEPT_MAX:
                del self._ended[ident]

    def _publish(self, sample: Sample, data: bytes) -> None:
        if self._ended:
            self._drop_old_ended()
        state = {
            "pid": self._pid,
            "tick": self.ticks,
            "monotonic": sample.monotonic,
            "timestamp": iso_utc_ms(sample.timestamp),
            "interval_s": self.settings.interval_s,
            "files": self.sink.paths(),
            "rows_failed": self.sink.rows_failed,
            "write_failures": entries(
                [
                    (RECORDER_CSV, self.sink.failures),
                    ("allocations.csv", self._summary_log.failures),
                ],
                "recorder",
            ),
            "ticks_missed": self.ticker.missed,
            "allocation_stats": {k: v.to_json() for k, v in self._alloc_stats.items()},
            "ended_allocations": {k: entry for k, (_, entry) in self._ended.items()},
            "last_power": {str(g): list(tp) for g, tp in self.sink.last_power.items()},
            "gpus_stuck": [g.index for g in sample.gpus if g.stuck],
            "gpus": [reading_values(g) for g in sample.gpus],
            "pretrigger": {"ticks": self.head_ticks, "seconds": round(self.head_s, 3)},
            "detected": self.detected.open(),
            "processes": [self._process_json(p) for p in sample.processes],
            "processes_notice": self.attribution.notice,
        }
        try:
            atomic_write_fixed_tmp(self._metrics_path, data)
            atomic_write_fixed_tmp(
                self._state_path, json.dumps(state, separators=(",", ":")).encode()
            )
        except OSError as exc:
            if not self._runtime_failing:
                self._runtime_failing = True
                log.error("cannot write state files in %s: %s", self.run_dir, exc)
            return
        if self._runtime_failing:
            self._runtime_failing = False
            log.warning("writing state files in %s recovered", self.run_dir)

    # ------------------------------------------------------------------ serving
    def metrics_bytes(self) -> bytes:
        """What a standalone ``/metrics`` serves: the latest rendering plus telemetry_active."""
        return self.exposition.latest + _ACTIVE

    def health(self) -> tuple[bool, str]:
        last = self.last_tick_monotonic
        limit = max(10.0, 5 * self.settings.interval_s)
        if last is None:
            return True, "starting"
        age = self._clock() - last
        if age > limit:
            return False, f"no tick for {age:.1f} s"
        return True, f"ok: tick {self.ticks}, {self.sink.rows_failed} rows failed"


def last_power_from(state: object) -> dict[int, tuple[float, float | None]]:
    """``last_power`` of a predecessor's ``recorder.json``: per GPU, its last row's time and
    power (where a new recorder's first rows join, as ``gputel report`` joins their files)."""
    items = state.get("last_power") if isinstance(state, dict) else None
    out: dict[int, tuple[float, float | None]] = {}
    if not isinstance(items, dict):
        return out
    for key, value in items.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(value, list)):
            continue
        if len(value) != 2:
            continue
        t, p = finite(value[0]), finite(value[1])
        if t is not None:
            out[int(key)] = (t, p)
    return out


def ended_from(state: object) -> dict[str, dict[str, object]]:
    """``ended_allocations`` of a predecessor's ``recorder.json``: kept, so that a release
    that waits for its allocation's final statistics finds them across a recorder restart."""
    items = state.get("ended_allocations") if isinstance(state, dict) else None
    if not isinstance(items, dict):
        return {}
    return {
        k: v
        for k, v in list(items.items())[-ENDED_KEPT_MAX:]
        if isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("start"), str)
    }


def run_record(settings: Settings, *, child: bool) -> int:
    """Open the sources, run the loop until SIGTERM/SIGINT, and return the exit code.

    Raises ``GpuSourceError`` when the chosen backend cannot start (the CLI maps it to exit 1).
    """
    from gputel.sources.select import open_gpu_source, open_host_sources

    agent: lineage.Identity | None = None
    if child:
        agent = lineage.agent_of_child()
        # Ask first, then look: an agent that died before the request is caught by the look,
        # one that dies after it by the kernel (SIGTERM: the loop stops after its tick).
        lineage.die_with_parent(signal.SIGTERM)
        if not lineage.parent_is(agent):
            log.warning("agent (pid %d) is gone before the recorder started; exiting", agent.pid)
            return 1
    gpu_source, notice = open_gpu_source(settings)
    if notice:
        # Under an agent the same notice is already in the journal (and in gputel status) from
        # the agent's own open of the GPUs: once is enough.
        log.log(logging.INFO if child else logging.WARNING, "%s", notice)
    gpu_source = with_read_deadline(gpu_source, settings.interval_s)
    host_sources = open_host_sources(settings)

    # Only a child publishes recorder.json and metrics.prom: they exist for its agent. A
    # standalone recorder serves its own /metrics and leaves any agent's run directory alone.
    write_runtime = child
    head: list[HeadTick] = []
    if child:
        runtime.ensure_run_dir(settings.run_dir)
        # Held until this process exits: an older child still writing is stopped first.
        runtime.take_recorder_lock(settings.run_dir)
        # Taken once, before the first tick: the agent wrote it just before starting us.
        head = take_head(settings.run_dir / runtime.PRETRIGGER_FILE)
    recorder = Recorder(
        settings,
        gpu_source,
        host_sources,
        write_runtime=write_runtime,
        parent_pid=agent.pid if agent is not None else None,
        head=head,
    )
    recorder.install_signal_handlers()
    server: MetricsServer | None = None
    if not child and settings.exporter_port != 0:
        server = MetricsServer(
            settings.exporter_addr,
            settings.exporter_port,
            metrics=recorder.metrics_bytes,
            health=recorder.health,
            web_config=settings.web_config,
        )
        try:
            server.start()
            log.info("serving /metrics on %s:%d", settings.exporter_addr, server.port)
        except OSError as exc:
            log.error("%s; recording CSV without /metrics", exc)
            server = None
    log.info(
        "recording %d GPU(s) from %s every %g s to %s",
        len(gpu_source.devices()),
        gpu_source.name,
        settings.interval_s,
        settings.log_dir,
    )
    try:
        return recorder.run()
    finally:
        if server is not None:
            server.stop()
        with contextlib.suppress(Exception):
            gpu_source.close()
        log.info(
            "stopped after %d ticks (%d rows failed)", recorder.ticks, recorder.sink.rows_failed
        )
