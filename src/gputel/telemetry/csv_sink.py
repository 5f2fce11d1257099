"""The per-second CSV files: ``gpu-*.csv`` (one row per GPU per tick), ``host-*.csv``, on GPUs in
MIG mode ``mig-*.csv`` (one row per MIG device per tick; no file where there is none) and
``processes-*.csv`` (one row per GPU process per tick; a file is opened only once a tick has a
process). Every kind follows the same session, day, size and reopen rules.

Rules that keep the files trustworthy after crashes, rotation and full disks:

- A file is created with ``O_EXCL`` and never appended to once closed: a session, a new UTC day,
  the size cap and ``reopen()`` (SIGHUP from logrotate) each start a new file, with its header.
  A name is used once, even within one second: a name whose file logrotate renamed away
  (``.csv.1``, ``.csv.1.gz``) is taken too, and the next ``_NNN`` suffix is used.
- A tick's rows go out in ONE ``os.write`` on an ``O_APPEND`` descriptor, with no userspace
  buffer, so after SIGKILL a row is whole or absent. A short write (disk full) is truncated back
  to the last good length, so a later successful write never follows half a row.
- A failed write or open is counted (``rows_failed``), logged once when it starts and once when it
  recovers, and retried on the next tick; sampling and exporting never wait for the disk.

A session may begin with the pre-trigger head (``write_head``): the agent's readings from
before telemetry started, GPU rows only, at the head of the first ``gpu-*.csv``, marked by a 1
in their ``pretrigger`` column.

Every value cell is written at its field's precision from the schema table (``Field.decimals``),
through ``formats.csv_cell``.

``energy_j`` is joules since the file began (``gputel.energy.SinceStart`` over the source's
cumulative counter), so each file stands alone. A counter that goes backwards (it restarted: a
GPU reset, a driver reload) adds that tick's power times the interval, and the accumulation
continues from the new value. ``tick_energy`` keeps each GPU's share of the latest tick by the
one allocation rule (``gputel.energy``, rule 4), for the allocation summaries.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import operator
import os
import re
import socket
from collections.abc import Callable, Sequence
from datetime import date, datetime
from functools import partial
from pathlib import Path

from gputel.energy import SinceStart, continuation_gap, trapezoid
from gputel.formats import (
    FailureCounter,
    RepeatCells,
    TornWrite,
    csv_cell,
    csv_row,
    iso_utc_ms,
    write_whole,
)
from gputel.schema import (
    GPU_CSV_COLUMNS,
    GPU_FIELDS,
    HOST_CSV_COLUMNS,
    HOST_FIELDS,
    MIG_CSV_COLUMNS,
    MIG_FIELDS,
    PROCESS_CSV_COLUMNS,
    PROCESS_DECIMALS,
    GpuReading,
    HostReading,
    Sample,
)
from gputel.telemetry.head import HeadTick

log = logging.getLogger("gputel.csv")

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
_MAX_SUFFIX = 999
_GPU_VALUE_ATTRS = tuple(f.attr for f in GPU_FIELDS)
#: A GPU reading's values in column order, taken in one C call.
_gpu_values = operator.attrgetter(*_GPU_VALUE_ATTRS)
_ENERGY_POS = _GPU_VALUE_ATTRS.index("energy_j")
_GPU_DECIMALS = tuple(f.decimals for f in GPU_FIELDS)
#: Owners (user, command, job) whose process-row cells are kept.
_OWNER_CELLS_MAX = 4096
_HOST_VALUE_ATTRS = tuple(f.attr for f in HOST_FIELDS)
_HOST_DECIMALS = tuple(f.decimals for f in HOST_FIELDS)
_MIG_VALUE_ATTRS = tuple(f.attr for f in MIG_FIELDS)
_MIG_DECIMALS = tuple(f.decimals for f in MIG_FIELDS)
_MEMORY_DECIMALS = PROCESS_DECIMALS["memory_used_mib"]
_SM_DECIMALS = PROCESS_DECIMALS["sm_util_pct"]


def short_hostname() -> str:
    return safe_host(socket.gethostname().split(".")[0])


def safe_host(name: str) -> str:
    """A host name fit for a file name: no separators, no leading dots."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]", "-", name).strip(".-")
    return cleaned or "localhost"


def _rotated_names(directory: Path, base: str) -> set[str]:
    """Names starting with ``base`` whose file logrotate has renamed (``x.csv.1``, ``x.csv.1.gz``).

    Such a name is used up even though the file itself is gone: a new file under it would be
    rotated onto the older copy's name, and logrotate's ``rotate`` count would delete the older
    copy (a forced rotation in a file's first second did exactly this).
    """
    taken: set[str] = set()
    with contextlib.suppress(OSError):
        for entry in os.listdir(directory):
            if entry.startswith(base):
                head, sep, _ = entry.partition(".csv.")
                if sep:
                    taken.add(head + ".csv")
    return taken


class _CsvFile:
    """One open output file of a kind (``gpu`` or ``host``) and what was written to it."""

    def __init__(self, directory: Path, prefix: str, host: str, header: Sequence[str]) -> None:
        self.directory = directory
        self.prefix = prefix
        self.host = host
        self.header = csv_row(header).encode()
        self.fd: int | None = None
        self.path: Path | None = None
        self.day: date | None = None
        self.size = 0
        """Bytes known good: the file is truncated back to this after a short write."""

    def open(self, first: datetime) -> None:
        stamp = first.strftime("%Y%m%dT%H%M%SZ")
        base = f"{self.prefix}-{stamp}-{self.host}"
        with contextlib.suppress(FileExistsError):
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
        taken = _rotated_names(self.directory, base)
        for n in range(_MAX_SUFFIX + 1):
            # "_NNN" sorts after the bare name, so names still sort by creation time.
            name = f"{base}.csv" if n == 0 else f"{base}_{n:03d}.csv"
            if name in taken:
                continue
            path = self.directory / name
            try:
                fd = os.open(path, _OPEN_FLAGS, 0o640)
            except FileExistsError:
                continue
            self.fd, self.path, self.day, self.size = fd, path, first.date(), 0
            return
        raise OSError(errno.EEXIST, f"no free file name for {base}.csv")

    def close(self) -> None:
        if self.fd is None:
            return
        fd, path, empty = self.fd, self.path, self.size == 0
        self.fd = None
        try:
            os.close(fd)
        finally:
            if empty and path is not None:
                # Never got its header (disk full at creation): leave no headerless file behind.
                with contextlib.suppress(OSError):
                    os.unlink(path)

    def write(self, rows: bytes) -> None:
        """Write the rows (and the header, first) in one call; whole or not at all."""
        assert self.fd is not None
        data = self.header + rows if self.size == 0 else rows
        try:
            write_whole(self.fd, data, self.size)
        except TornWrite:
            # Cannot repair the tail: abandon this file so no row is ever appended after a
            # partial one; the next tick opens a new file. (size >= 1 keeps close() from
            # unlinking it: it may hold a header and rows.)
            self.size = max(self.size, 1)
            self.close()
            raise
        self.size += len(data)


class CsvSink:
    """Writes each ``Sample`` to the current gpu/host files, opening new ones as the rules say."""

    def __init__(
        self,
        log_dir: Path,
        *,
        host: str | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        interval_s: float = 1.0,
    ) -> None:
        self.log_dir = Path(log_dir)
        self.continuation_gap_s = continuation_gap(interval_s)
        self.max_bytes = max_bytes
        hostname = safe_host(host) if host is not None else short_hostname()
        self._gpu = _CsvFile(self.log_dir, "gpu", hostname, GPU_CSV_COLUMNS)
        self._host = _CsvFile(self.log_dir, "host", hostname, HOST_CSV_COLUMNS)
        self._mig = _CsvFile(self.log_dir, "mig", hostname, MIG_CSV_COLUMNS)
        self._procs = _CsvFile(self.log_dir, "processes", hostname, PROCESS_CSV_COLUMNS)
        self._failures = FailureCounter(
            log,
            "cannot write CSV rows in %s; counting failed rows "
            "(gputel_csv_rows_failed_total), retrying every tick; "
            "free space or fix permissions on the directory",
            "CSV writing in %s recovered (%d rows failed in total)",
        )
        self._energy: dict[int, SinceStart] = {}
        """Per GPU of the current gpu file: joules since the file began."""
        self._gpu_cells: dict[int, RepeatCells] = {}
        """Per GPU: its last row's cells, reused where a value repeats."""
        self._owner_cells: dict[tuple[str | None, str | None, str | None], str] = {}
        """Per (user, command, job): the three cells of a process row."""
        self._process_tails: dict[tuple[int, int], tuple[tuple[object, ...], str]] = {}
        """Per (GPU, PID): its last row's values and the row after its time cell."""
        self.last_power: dict[int, tuple[float, float | None]] = {}
        """Per GPU: (epoch seconds, power) of its latest row written, in any file: where the
        next file's first row joins (a restarted recorder seeds it from its predecessor)."""
        self.tick_energy: dict[int, float | None] = {}
        """Per GPU: the energy of the interval ending at the latest tick (None: unknown)."""

    @property
    def rows_failed(self) -> int:
        """Rows that could not be written (disk full, read-only directory) since start."""
        return self._failures.rows_failed

    @property
    def failing(self) -> bool:
        return self._failures.failing

    @property
    def failures(self) -> FailureCounter:
        return self._failures

    @property
    def gpu_path(self) -> Path | None:
        return self._gpu.path if self._gpu.fd is not None else None

    @property
    def host_path(self) -> Path | None:
        return self._host.path if self._host.fd is not None else None

    @property
    def mig_path(self) -> Path | None:
        return self._mig.path if self._mig.fd is not None else None

    @property
    def processes_path(self) -> Path | None:
        return self._procs.path if self._procs.fd is not None else None

    def paths(self) -> dict[str, str | None]:
        paths = {
            "gpu": str(self.gpu_path) if self.gpu_path else None,
            "host": str(self.host_path) if self.host_path else None,
            "processes": str(self.processes_path) if self.processes_path else None,
        }
        if self.mig_path:
            paths["mig"] = str(self.mig_path)
        return paths

    def reopen(self) -> None:
        """Close the current files; the next write starts new ones (logrotate's SIGHUP)."""
        self._close_gpu()
        self._host.close()
        self._mig.close()
        self._procs.close()

    def close(self) -> None:
        self.reopen()

    def _close_gpu(self) -> None:
        self._gpu.close()
        self._energy.clear()

    def write(self, sample: Sample) -> None:
        stamp = iso_utc_ms(sample.timestamp)
        errors: list[str] = []
        failed = 0
        self.tick_energy = {}
        if sample.gpus:
            n = len(sample.gpus)
            err = self._emit(self._gpu, sample.timestamp, lambda: self._gpu_rows(sample, stamp))
            self._note_power(sample)
            if err:
                errors.append(err)
                failed += n
        err = self._emit(self._host, sample.timestamp, lambda: self._host_row(sample, stamp))
        if err:
            errors.append(err)
            failed += 1
        mig = [g for g in sample.gpus if g.mig]
        if mig:
            err = self._emit(
                self._mig, sample.timestamp, lambda: self._mig_rows(sample, mig, stamp)
            )
            if err:
                errors.append(err)
                failed += sum(len(g.mig) for g in mig)
        if sample.processes:
            err = self._emit(
                self._procs, sample.timestamp, lambda: self._process_rows(sample, stamp)
            )
            if err:
                errors.append(err)
                failed += len(sample.processes)
        if failed:
            self._failures.failed(failed, f"{self.log_dir}: {'; '.join(errors)}")
        else:
            self._failures.succeeded(self.log_dir)

    def write_head(self, ticks: Sequence[HeadTick]) -> None:
        """The pre-trigger rows, before the first sample of a session: GPU rows only (the agent
        reads no host source), the columns the agent did not read empty, ``energy_j`` counted
        from the head's first row so it runs on through the session's own rows."""
        for tick in ticks:
            sample = Sample(tick.timestamp, tick.monotonic, list(tick.gpus), HostReading(), [])
            stamp = iso_utc_ms(tick.timestamp)
            err = self._emit(
                self._gpu, tick.timestamp, partial(self._gpu_rows, sample, stamp, True)
            )
            self._note_power(sample)
            if err:
                self._failures.failed(len(tick.gpus), f"{self.log_dir}: {err}")
            else:
                self._failures.succeeded(self.log_dir)

    def _note_power(self, sample: Sample) -> None:
        t = sample.timestamp.timestamp()
        for g in sample.gpus:
            self.last_power[g.index] = (t, g.power_w)

    def _emit(self, f: _CsvFile, ts: datetime, build: Callable[[], bytes]) -> str | None:
        if f.fd is not None and (f.day != ts.date() or f.size >= self.max_bytes):
            if f is self._gpu:
                self._close_gpu()
            else:
                f.close()
        try:
            if f.fd is None:
                if f is self._gpu:
                    self._energy.clear()
                f.open(ts)
            rows = build()
            if f.size and f.size + len(rows) > self.max_bytes:
                if f is self._gpu:
                    self._close_gpu()
                    f.open(ts)
                    rows = build()
                else:
                    f.close()
                    f.open(ts)
            f.write(rows)
        except OSError as exc:
            return f"{f.prefix}: {exc.strerror or exc}"
        return None

    def _gpu_rows(self, sample: Sample, stamp: str, head: bool = False) -> bytes:
        lines: list[str] = []
        pretrigger = "1" if head else "0"
        energy = self._energy
        default_alloc = ";".join(sample.allocations)
        per_gpu = sample.gpu_allocations
        t = sample.timestamp.timestamp()
        for g in sample.gpus:
            values = list(_gpu_values(g))
            since = energy.get(g.index)
            same_file = since is not None
            if since is None:
                since = energy[g.index] = SinceStart()
            raw, started, before = values[_ENERGY_POS], since.started, since.joules
            values[_ENERGY_POS] = since.add(raw, t, g.power_w)
            if not head:
                self.tick_energy[g.index] = self._tick_share(
                    g.index,
                    t,
                    g.power_w,
                    raw is not None and started,
                    since.joules - before,
                    same_file,
                )
            alloc = ";".join(per_gpu[g.index]) if g.index in per_gpu else default_alloc
            cells = [
                stamp,
                str(g.index),
                csv_cell(g.uuid),
                csv_cell(g.name),
                "1" if g.lost else "0",
            ]
            repeat = self._gpu_cells.get(g.index)
            if repeat is None:
                repeat = self._gpu_cells[g.index] = RepeatCells(_GPU_DECIMALS)
            cells.extend(repeat.cells(values))
            cells.append(csv_cell(alloc) if alloc else "")
            cells.append(pretrigger)
            lines.append(",".join(cells))
        lines.append("")
        return "\n".join(lines).encode()

    def _tick_share(
        self,
        gpu: int,
        t: float,
        power_w: float | None,
        counted: bool,
        rise: float,
        same_file: bool,
    ) -> float | None:
        """The energy of the interval ending at this row (``gputel.energy``, rule 4): the
        counter's rise within a file, else power integrated from the GPU's previous row (in
        this file, or the previous file's last row within the continuation gap)."""
        if counted:
            return rise
        last = self.last_power.get(gpu)
        if last is None:
            return None
        dt = t - last[0]
        if not same_file and dt > self.continuation_gap_s:
            return None
        return trapezoid(last[1], power_w, dt)

    def _mig_rows(self, sample: Sample, gpus: list[GpuReading], stamp: str) -> bytes:
        lines: list[str] = []
        default_alloc = ";".join(sample.allocations)
        per_gpu = sample.gpu_allocations
        for g in gpus:
            alloc = ";".join(per_gpu[g.index]) if g.index in per_gpu else default_alloc
            head = [stamp, str(g.index), csv_cell(g.uuid)]
            for m in g.mig:
                cells = [*head, str(m.gi), "" if m.ci is None else str(m.ci), csv_cell(m.mig_uuid)]
                cells.extend(
                    map(csv_cell, [getattr(m, a) for a in _MIG_VALUE_ATTRS], _MIG_DECIMALS)
                )
                cells.append(csv_cell(alloc) if alloc else "")
                lines.append(",".join(cells))
        lines.append("")
        return "\n".join(lines).encode()

    def _process_rows(self, sample: Sample, stamp: str) -> bytes:
        """One row per process per GPU. All but a row's time are reused while the process,
        its owner and its values stay the same (a long job's processes, tick after tick)."""
        owners, tails = self._owner_cells, self._process_tails
        if len(owners) > _OWNER_CELLS_MAX:
            owners.clear()  # owners come and go; keep the caches bounded
        if len(tails) > _OWNER_CELLS_MAX:
            tails.clear()
        lines: list[str] = []
        for p in sample.processes:
            mem, sm = p.memory_used_mib, p.sm_util_pct
            # With the numbers' types: 1 == 1.0, yet they are written differently.
            values = (p.user, p.command, p.job, mem, sm, mem.__class__, sm.__class__)
            where = (p.gpu, p.pid)
            cached = tails.get(where)
            if cached is None or cached[0] != values:
                key = values[:3]
                owner = owners.get(key)
                if owner is None:
                    owner = owners[key] = ",".join(map(csv_cell, key))
                tail = ",".join(
                    (
                        str(p.gpu),
                        str(p.pid),
                        owner,
                        csv_cell(mem, _MEMORY_DECIMALS),
                        csv_cell(sm, _SM_DECIMALS),
                    )
                )
                tails[where] = (values, tail)
            else:
                tail = cached[1]
            lines.append(f"{stamp},{tail}")
        lines.append("")
        return "\n".join(lines).encode()

    def _host_row(self, sample: Sample, stamp: str) -> bytes:
        h = sample.host
        cells = [stamp]
        cells.extend(map(csv_cell, [getattr(h, a) for a in _HOST_VALUE_ATTRS], _HOST_DECIMALS))
        return (",".join(cells) + "\n").encode()
