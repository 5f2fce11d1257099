"""Who is on each GPU: the recorder's process owners and the jobs it detects from them.

Each tick the GPU source lists the processes on every GPU by PID (``GpuReading.processes``).
:class:`ProcessAttribution` looks their owners up in procfs (``gputel.sources.owners``: each
PID's files read once) and gives the rows of ``processes-*.csv``. :class:`DetectedJobs` turns
the owners' job ids into allocations of the GPUs they are on (``docs/attribution.md``): the id
goes into those GPUs' ``allocations`` cells while the job has processes there, and when it has
none left anywhere, one summary row goes to ``allocations.csv``.

Detection lives in the recorder because only the recorder sees the processes (in its full read,
while recording) and it writes both the rows and the summaries; the agent shows what the
recorder reports in ``recorder.json`` and never counts a detected job as a reason to record.
A detected job whose id an announced allocation has (the Slurm prolog opens ``slurm-<jobid>``,
the id detection gives the same job) is that allocation: it is tagged once and summarised by
the agent's store when it is released, never twice.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from gputel.allocstats import AllocationStats
from gputel.control.allocations import release_summary
from gputel.formats import iso_utc_ms
from gputel.schema import GpuReading, ProcessRecord, Sample
from gputel.sources.owners import OwnerResolver, ProcessOwner, host_pids_hidden

log = logging.getLogger("gputel.telemetry.jobs")

#: ``release_reason`` of a detected job whose last process left its GPUs.
JOB_LEFT = "job left the GPUs"
#: ``release_reason`` of detected jobs still on the GPUs when the recorder stops.
RECORDING_STOPPED = "recording stopped"


class ProcessAttribution:
    """The owners of the PIDs on the GPUs, tick after tick.

    At start it checks once whether the host's PIDs (the ones NVML reports) can be looked up
    under the proc root (``host_pids_hidden``); if not, ``notice`` says why and how to fix it
    (the recorder logs it once, ``gputel status`` shows it) and processes are recorded without
    owners.
    """

    def __init__(self, proc_root: Path) -> None:
        self.notice = host_pids_hidden(proc_root)
        self.resolver: OwnerResolver | None = None
        if self.notice is None:
            self.resolver = OwnerResolver(proc_root)

    def records(self, gpus: Iterable[GpuReading]) -> list[ProcessRecord]:
        """One record per process per GPU, owners filled where known, in GPU then NVML order."""
        listed = [p for g in gpus if g.processes for p in g.processes]
        owners: Mapping[int, ProcessOwner | None] = {}
        if self.resolver is not None:
            # Every tick, also one without processes: the resolver counts ticks to know that a
            # PID back after an absence must have its start time checked (a reused PID).
            owners = self.resolver.resolve(p.pid for p in listed)
        if not listed:
            return []
        out: list[ProcessRecord] = []
        for p in listed:
            owner = owners.get(p.pid)
            out.append(
                ProcessRecord(
                    gpu=p.gpu,
                    pid=p.pid,
                    user=owner.user if owner else None,
                    command=owner.command if owner else None,
                    job=owner.job if owner else None,
                    memory_used_mib=p.memory_used_mib,
                    sm_util_pct=p.sm_util_pct,
                )
            )
        return out


def jobs_by_gpu(records: Iterable[ProcessRecord]) -> dict[int, tuple[str, ...]]:
    """Per GPU index, the distinct job ids of its processes, in the order first seen."""
    found: dict[int, dict[str, None]] = {}
    for r in records:
        if r.job is not None:
            found.setdefault(r.gpu, {})[r.job] = None
    return {gpu: tuple(ids) for gpu, ids in found.items()}


def merge_ids(*groups: Iterable[str]) -> tuple[str, ...]:
    """Allocation ids of a row: each once, announced ones first (same id = one allocation)."""
    return tuple(dict.fromkeys(i for group in groups for i in group))


@dataclass
class _Job:
    """A detected job while it is on some GPU."""

    id: str
    start: datetime
    gpus: set[int]
    """Every GPU it has been seen on."""
    on: frozenset[int]
    """The GPUs it is on at the latest tick."""
    stats: AllocationStats = field(default_factory=AllocationStats)
    """Its statistics and energy (``stats.energy_j``: the intervals ending at the ticks it was
    on its GPUs, :meth:`DetectedJobs.add_energy`; None until one is known)."""
    energy_lost: bool = False
    """A tick's GPUs could not be listed while it was on them: its energy is unknown."""
    shared: bool = False
    """Another job, an announced allocation or a process of unknown owner was on one of its
    GPUs at some tick: its energy cannot be told apart."""


class SummarySink(Protocol):
    """Where ended jobs' summaries go (``control.allocations.SummaryLog``)."""

    def append(self, summary: Mapping[str, Any]) -> None: ...


class DetectedJobs:
    """The jobs found on the GPUs, opened when first seen and summarised when gone.

    Energy is the one allocation rule (``gputel.energy``, rule 4: the energy of the interval
    ending at each tick the job is on a GPU, :meth:`add_energy`), the same ``gputel report``
    counts from its rows; any sharing (another job,
    an announced allocation of another id, a process whose owner is unknown) empties it and sets
    ``shared``. A tick in which a GPU's processes could not be listed (the GPU lost, stuck, or
    the call failed) ends nobody on it and makes the job's energy unknown.
    """

    def __init__(
        self, summaries: SummarySink | None = None, interval_s: float | None = None
    ) -> None:
        self._summaries = summaries
        """Where summaries are written (None: they are only returned)."""
        self._interval_s = interval_s
        """The sampling interval: one throttled tick counts this many ``throttled_s``."""
        self._jobs: dict[str, _Job] = {}

    def ids(self) -> list[str]:
        """The ids of the detected jobs now (each tick's ``gputel_allocation_info``)."""
        return list(self._jobs)

    def open(self) -> list[dict[str, Any]]:
        """The detected jobs now: ``{"id", "gpus", "start"}`` each (for ``recorder.json``)."""
        return [
            {"id": j.id, "gpus": sorted(j.on), "start": iso_utc_ms(j.start)}
            for j in self._jobs.values()
        ]

    def update(
        self,
        sample: Sample,
        announced: Mapping[int, tuple[str, ...]],
        announced_ids: Iterable[str],
    ) -> tuple[dict[int, tuple[str, ...]], list[dict[str, Any]]]:
        """Take one tick; (detected job ids per GPU this tick, summaries of jobs that ended).

        ``announced``: per GPU, the announced allocations that claim it; ``announced_ids``:
        every open announced id (a job with one of them is that allocation, not a new one).
        """
        on_gpu = jobs_by_gpu(sample.processes)
        unknown_owner = {r.gpu for r in sample.processes if r.job is None}
        listed = {g.index for g in sample.gpus if g.processes is not None}
        hooked = set(announced_ids)
        by_index = {g.index: g for g in sample.gpus}
        present: dict[str, set[int]] = {}
        for gpu, ids in on_gpu.items():
            for ident in ids:
                present.setdefault(ident, set()).add(gpu)
        ended: list[dict[str, Any]] = []
        for ident in list(self._jobs):
            job = self._jobs[ident]
            if ident in hooked:
                # Announced meanwhile (a prolog that ran late): one allocation, the store's.
                del self._jobs[ident]
            elif ident not in present and not (job.on - listed):
                ended.append(self._close(job, sample.timestamp, JOB_LEFT))
        for ident, gpus in present.items():
            if ident in hooked:
                continue
            found = self._jobs.get(ident)
            if found is None:
                found = self._jobs[ident] = _Job(
                    ident, sample.timestamp, set(gpus), frozenset(gpus)
                )
            self._step(found, frozenset(gpus), by_index, on_gpu, announced, unknown_owner)
        for job in self._jobs.values():
            if job.id not in present:
                # Its GPUs could not be listed this tick: kept, but the interval is unknown.
                job.energy_lost = True
        return on_gpu, ended

    def _step(
        self,
        job: _Job,
        gpus: frozenset[int],
        readings: Mapping[int, GpuReading],
        on_gpu: Mapping[int, tuple[str, ...]],
        announced: Mapping[int, tuple[str, ...]],
        unknown_owner: set[int],
    ) -> None:
        for gpu in gpus:
            others = set(on_gpu.get(gpu, ())) | set(announced.get(gpu, ()))
            if others - {job.id} or gpu in unknown_owner:
                job.shared = True
        job.on = gpus
        job.gpus |= gpus
        mine = [readings[i] for i in sorted(gpus) if i in readings]
        job.stats.add_tick(mine, None, self._interval_s)

    def add_energy(self, shares: Mapping[int, float | None]) -> None:
        """This tick's energy per GPU (``CsvSink.tick_energy``, the one allocation rule of
        ``gputel.energy``) for each job on the GPUs it is on now; an unknown share is left out,
        as ``gputel report`` leaves it out."""
        for job in self._jobs.values():
            if not job.energy_lost:
                job.stats.add_energy(shares, job.on)

    def _close(self, job: _Job, end: datetime, reason: str) -> dict[str, Any]:
        del self._jobs[job.id]
        energy = job.stats.energy_j
        summary = release_summary(
            job.id,
            sorted(job.gpus),
            job.start,
            end,
            None if job.shared or job.energy_lost or energy is None else round(energy, 6),
            job.stats.to_json(),
            reason,
        )
        summary["shared"] = 1 if job.shared else 0
        if self._summaries is not None:
            self._summaries.append(summary)
        log.info(
            "detected job %s ended (%s) after %.1fs on GPU(s) %s",
            job.id,
            reason,
            summary["duration_s"],
            ",".join(map(str, summary["gpus"])),
        )
        return summary

    def close_all(self, end: datetime) -> list[dict[str, Any]]:
        """Summarise every job still open (the recorder stops and can no longer see them)."""
        return [self._close(job, end, RECORDING_STOPPED) for job in list(self._jobs.values())]
